// Runs a Python script under the official MicroPython WebAssembly port, with
// the project's meter-side modules on its file system.
//
//   node tests/mpy/runner.mjs SCRIPT.py [--heap 1024k] [--tree DIR:GUEST]...
//        [--file HOST:GUEST]... [--out GUEST:HOST]...
//
// By default the project's shared/, firmware/, tests/mpy/ and tests/vectors/
// are copied to /proj inside MicroPython and /proj is put on sys.path.
// --tree replaces that default list (used to boot a built .mpy bundle).
// os.urandom is wired to the host's CSPRNG, as the ESP32 port wires it to
// its hardware RNG. Exit status: 0 if the script ran to the end, 1 on an
// uncaught Python exception (its traceback goes to stderr), 2 on usage error.
// The benchmarks (bench/m_mpy.py) use this runner too.
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");

function usage(msg) {
  process.stderr.write(`runner.mjs: ${msg}\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
let script = null;
let heap = 1024 * 1024;
const trees = [];
const files = [];
const outs = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  const next = () => (i + 1 < args.length ? args[++i] : usage(`${a} needs a value`));
  if (a === "--heap") {
    const v = next().toLowerCase();
    heap = parseInt(v, 10) * (v.endsWith("k") ? 1024 : v.endsWith("m") ? 1048576 : 1);
  } else if (a === "--tree") trees.push(next().split(":"));
  else if (a === "--file") files.push(next().split(":"));
  else if (a === "--out") outs.push(next().split(":"));
  else if (!script) script = a;
  else usage(`unexpected argument ${a}`);
}
if (!script) usage("no script given");
if (trees.length === 0) {
  for (const d of ["shared", "firmware", "tests/mpy", "tests/vectors"]) {
    trees.push([path.join(root, d), `/proj/${d}`]);
  }
}

const mp = await loadMicroPython({
  heapsize: heap,
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
  if (!fs.existsSync(host)) return;
  mkdirs(guest);
  for (const ent of fs.readdirSync(host, { withFileTypes: true })) {
    if (ent.name === "__pycache__" || ent.name.startsWith(".")) continue;
    const h = path.join(host, ent.name);
    const g = `${guest}/${ent.name}`;
    if (ent.isDirectory()) copyTree(h, g);
    else if (/\.(py|mpy|json|txt|bin)$/.test(ent.name)) mp.FS.writeFile(g, fs.readFileSync(h));
  }
}

for (const [h, g] of trees) copyTree(h, g);
for (const [h, g] of files) {
  mkdirs(path.posix.dirname(g));
  mp.FS.writeFile(g, fs.readFileSync(h));
}
mkdirs("/flash");

mp.registerJsModule("_hostrng", {
  hex: (n) => crypto.randomBytes(n).toString("hex"),
});
mp.runPython(`
import sys, os, binascii, _hostrng
sys.path.insert(0, '/proj/tests/mpy')
sys.path.insert(0, '/proj')
def _urandom(n):
    return binascii.unhexlify(_hostrng.hex(n))
os.urandom = _urandom
del _urandom
`);

// A script may be split at lines "#@@ part": each part is one runPython call
// in the same interpreter. The port's gc.collect() frees nothing while a
// runPython call is on the stack (the wasm stack cannot be scanned), so a
// heap measurement that needs a real collection starts a new part.
let status = 0;
for (const part of fs.readFileSync(script, "utf8").split(/^#@@ part.*$/m)) {
  try {
    mp.runPython(part);
  } catch (err) {
    if (err && err.name === "PythonError") {
      if (err.type !== "SystemExit") {
        process.stderr.write(err.message + "\n");
        status = 1;
      }
      break;
    }
    throw err;
  }
}
for (const [g, h] of outs) {
  try {
    fs.writeFileSync(h, mp.FS.readFile(g));
  } catch (e) {
    process.stderr.write(`runner.mjs: could not copy ${g} out: ${e}\n`);
    status = status || 1;
  }
}
process.exit(status);
