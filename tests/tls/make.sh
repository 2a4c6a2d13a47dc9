#!/bin/sh
# Makes the TLS test certificates in this directory (committed; run again
# only to change them): a CA, a server certificate for 127.0.0.1, ::1 and
# localhost, a client certificate from the same CA, and a second CA with a
# client certificate of its own (a peer the first CA does not vouch for).
# Valid for 100 years; EC P-256 keys in PKCS#8. Test data only: the keys
# are public.
set -eu
cd "$(dirname "$0")"
days=36500
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
ca() {
    key "$1.key"
    openssl req -x509 -new -key "$1.key" -days $days -subj "/CN=distcore test $1" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -out "$1.pem"
}
leaf() { # name ca subject extensions
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$3" -out "$1.csr"
    printf '%s\n' "$4" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
        -days $days -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext" "$2.srl"
}
ca ca
ca other-ca
leaf server ca localhost "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth
basicConstraints=CA:FALSE"
leaf client ca "distcore test client" "extendedKeyUsage=clientAuth
basicConstraints=CA:FALSE"
leaf other-client other-ca "distcore test outsider" "extendedKeyUsage=clientAuth
basicConstraints=CA:FALSE"
rm -f ca.key other-ca.key
