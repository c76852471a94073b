// Run a benchmark script under the MicroPython WebAssembly port (the npm
// package pinned in package.json, as tests/mpy/runner.mjs does), in parts:
//
//   node bench/mpy_runner.mjs SCRIPT.py IN.json OUT.json
//
// The script is split at lines "#@@ part"; each part is one runPython call
// in the same interpreter. The port's gc.collect() frees nothing while a
// runPython call is on the stack (the JS/wasm stack cannot be scanned), so a
// heap measurement that needs a collection starts a new part. shared/ and
// firmware/ are copied to /proj (on sys.path); IN.json is /proj/in.json and
// /proj/out.json is copied back to OUT.json.
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const [script, input, output] = process.argv.slice(2);
const mp = await loadMicroPython({
  heapsize: 1024 * 1024,
  linebuffer: false,
  stdout: (b) => process.stdout.write(b),
  stderr: (b) => process.stderr.write(b),
});

function mkdirs(guest) {
  let cur = "";
  for (const part of guest.split("/").filter(Boolean)) {
    cur += "/" + part;
    try { mp.FS.mkdir(cur); } catch (e) { /* exists */ }
  }
}
function copyTree(host, guest) {
  mkdirs(guest);
  for (const ent of fs.readdirSync(host, { withFileTypes: true })) {
    if (ent.name === "__pycache__" || ent.name.startsWith(".")) continue;
    const h = path.join(host, ent.name);
    const g = `${guest}/${ent.name}`;
    if (ent.isDirectory()) copyTree(h, g);
    else if (/\.(py|json)$/.test(ent.name)) mp.FS.writeFile(g, fs.readFileSync(h));
  }
}
for (const d of ["shared", "firmware"]) copyTree(path.join(root, d), `/proj/${d}`);
mkdirs("/flash");
mp.FS.writeFile("/proj/in.json", fs.readFileSync(input));
mp.registerJsModule("_hostrng", { hex: (n) => crypto.randomBytes(n).toString("hex") });
mp.runPython(`
import sys, os, binascii, _hostrng
sys.path.insert(0, '/proj')
def _urandom(n):
    return binascii.unhexlify(_hostrng.hex(n))
os.urandom = _urandom
del _urandom
`);
let status = 0;
for (const part of fs.readFileSync(script, "utf8").split(/^#@@ part.*$/m)) {
  try {
    mp.runPython(part);
  } catch (err) {
    if (err && err.name === "PythonError") {
      process.stderr.write(err.message + "\n");
      status = 1;
      break;
    }
    throw err;
  }
}
if (status === 0) fs.writeFileSync(output, mp.FS.readFile("/proj/out.json"));
process.exit(status);
