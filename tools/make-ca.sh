#!/usr/bin/env bash
# A small test CA and a broker certificate signed by it, for a test or pilot
# deployment (docs/brokers.md, "TLS"). Not for production: a utility's own PKI
# issues production certificates.
#
#   tools/make-ca.sh OUTDIR [BROKER_HOSTNAME [SAN ...]]
#
#   OUTDIR            created if missing; existing files there are replaced
#   BROKER_HOSTNAME   the name clients connect to (default: localhost)
#   SAN               extra subjectAltName entries, e.g. IP:192.0.2.10 DNS:mqtt
#                     (for localhost without extra SANs: IP:127.0.0.1, IP:::1)
#   CLIENTS="m1 d1"   environment: also issue client certificates with these
#                     common names (for `require_certificate true`)
#
# Writes ca.crt ca.key broker.crt broker.key [client-NAME.crt client-NAME.key].
# Keys are 0600, certificates 0644. Keys are EC P-256; the CA is valid 10 years,
# leaf certificates 825 days (the most that current TLS clients accept).
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
command -v openssl >/dev/null || { echo "make-ca.sh: openssl is missing (apt-get install openssl)" >&2; exit 1; }

out=$1
host=${2:-localhost}
shift $(( $# >= 2 ? 2 : 1 ))
sans="DNS:${host}"
for s in "$@"; do sans="${sans},${s}"; done
if [ "$host" = "localhost" ] && [ $# -eq 0 ]; then sans="${sans},IP:127.0.0.1,IP:::1"; fi

umask 077
mkdir -p "$out"
cd "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

# 1. The CA.
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout ca.key -out ca.crt -days 3650 -sha256 -set_serial "$(serial)" \
    -subj "/O=Sealed meter test/CN=Sealed meter test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null

# 2. A leaf certificate: issue NAME CN EXTENSIONS
issue() {
    local name=$1 cn=$2 ext=$3
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "${name}.key" -out "$work/${name}.csr" \
        -subj "/O=Sealed meter test/CN=${cn}" 2>/dev/null
    printf '%b' "$ext" > "$work/${name}.ext"
    openssl x509 -req -in "$work/${name}.csr" -CA ca.crt -CAkey ca.key \
        -set_serial "$(serial)" -days 825 -sha256 \
        -extfile "$work/${name}.ext" -out "${name}.crt" 2>/dev/null
    openssl verify -CAfile ca.crt "${name}.crt" >/dev/null
}

issue broker "$host" "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=${sans}\n"
for c in ${CLIENTS:-}; do
    issue "client-${c}" "$c" "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
done

chmod 0600 ./*.key
chmod 0644 ./*.crt
echo "make-ca.sh: wrote $(ls | tr '\n' ' ')in $(pwd) (broker SAN: ${sans})"
