#!/usr/bin/env bash
# Create and maintain the fleet's certificate authority, the broker's server certificate
# and one client certificate per node (or aggregator, or bridge). Idempotent: what exists
# is kept, so running the same command twice changes nothing.
#
# The client certificate's common name (CN) is the MQTT identity: the broker's
# `use_identity_as_username` turns it into the username that the ACL's %u matches, so a
# node id must be a valid single topic level.
#
# Layout of DIR:
#   ca.crt                  the CA certificate: copy to the broker and to every client
#   private/ca.key          the CA key: keep it off the broker, ideally offline
#   crl.pem                 revocation list for the broker's `crlfile`
#   server.crt, server.key  the broker's certificate and key
#   clients/ID.crt, .key    one pair per client identity
#   ca.cnf, index.txt, ...  OpenSSL CA bookkeeping (issued and revoked certificates)
#
# Needs OpenSSL >= 1.1.1 (rand_serial, -ext). Keys are ECDSA P-256.
set -euo pipefail

PROG=$(basename "$0")
DIR=${ESTDP_PKI_DIR:-./pki}
DAYS=825
CA_DAYS=3650
CRL_DAYS=3650
CA_NAME="ensemble-stdp fleet CA"
RENEW=0
REVOKE=()
SERVER_NAMES=()
CLIENTS=()

usage() {
    cat <<EOF
Usage: $PROG [options] [CLIENT_ID...]

Create (once) a CA in DIR, a broker certificate for the names given with --server, and a
client certificate for each CLIENT_ID (a node id, "aggregator", "bridge-SITE", ...).
Existing certificates are kept; run it again with more ids to add nodes.

Options:
  -d, --dir DIR        PKI directory (default: \$ESTDP_PKI_DIR or ./pki)
  -s, --server NAME    DNS name or IP address of the broker; repeat for several names.
                       The first one is the certificate's CN.
      --days N         validity of new server/client certificates in days (default: $DAYS)
      --ca-name NAME   common name of a new CA (default: "$CA_NAME")
      --renew          reissue the named server/client certificates with new keys
                       (the old ones stay valid until they expire or are revoked)
      --revoke ID      revoke the client certificate of ID and rewrite crl.pem;
                       repeatable. Copy crl.pem to the broker and restart it.
  -h, --help           show this help

Example:
  $PROG --dir pki --server broker.lab.example --server 10.0.0.5 aggregator node-01 node-02
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

log() {
    echo "$PROG: $*" >&2
}

while (($#)); do
    case $1 in
        -d | --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        -s | --server) SERVER_NAMES+=("${2:?--server needs a value}"); shift 2 ;;
        --days) DAYS=${2:?--days needs a value}; shift 2 ;;
        --ca-name) CA_NAME=${2:?--ca-name needs a value}; shift 2 ;;
        --renew) RENEW=1; shift ;;
        --revoke) REVOKE+=("${2:?--revoke needs a value}"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; CLIENTS+=("$@"); break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) CLIENTS+=("$1"); shift ;;
    esac
done

command -v openssl >/dev/null || die "openssl is not installed"
[[ $DAYS =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive integer, got '$DAYS'"

# A client id becomes one MQTT topic level (ACL %u) and a file name: no '/', '+', '#',
# spaces or leading dots.
valid_id() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]
}

for id in "${CLIENTS[@]}" "${REVOKE[@]}"; do
    valid_id "$id" || die "invalid client id '$id': use 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ -)"
done

is_ip() {
    [[ $1 =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $1 == *:* ]]
}

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
export ESTDP_PKI="$DIR"
CNF="$DIR/ca.cnf"
umask 077

write_ca_config() {
    # ESTDP_PKI and ESTDP_SAN come from the environment so that the directory can move.
    cat >"$CNF" <<'EOF'
# OpenSSL configuration of the ensemble-stdp fleet CA (written by make-certs.sh).
[ ca ]
default_ca = estdp_ca

[ estdp_ca ]
dir = $ENV::ESTDP_PKI
database = $dir/index.txt
new_certs_dir = $dir/newcerts
certificate = $dir/ca.crt
private_key = $dir/private/ca.key
crlnumber = $dir/crlnumber
rand_serial = yes
default_md = sha256
policy = policy_cn
unique_subject = no
copy_extensions = none
email_in_dn = no
# A CRL past its nextUpdate makes the broker refuse every client: keep it long-lived.
default_crl_days = 3650

[ policy_cn ]
commonName = supplied
organizationName = optional

[ req ]
distinguished_name = req_dn
prompt = no

[ req_dn ]
CN = unused

[ ca_ext ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ server_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $ENV::ESTDP_SAN
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[ client_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
}

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 600 "$1"
}

# sign CSR CRT EXTENSIONS: issue a certificate from the CA's database.
sign() {
    openssl ca -batch -config "$CNF" -notext -days "$DAYS" -extensions "$3" \
        -in "$1" -out "$2" 2>"$DIR/.openssl.log" || {
        cat "$DIR/.openssl.log" >&2
        die "openssl could not sign $2"
    }
    chmod 644 "$2"
}

write_crl() {
    openssl ca -batch -config "$CNF" -gencrl -crldays "$CRL_DAYS" -out "$DIR/crl.pem" 2>"$DIR/.openssl.log" || {
        cat "$DIR/.openssl.log" >&2
        die "openssl could not write the CRL"
    }
    chmod 644 "$DIR/crl.pem"
}

# ---- CA ---------------------------------------------------------------------------------
export ESTDP_SAN="DNS:unused"
if [[ ! -f $DIR/ca.crt ]]; then
    [[ -f $DIR/private/ca.key ]] && die "$DIR/private/ca.key exists without ca.crt: refusing to overwrite it"
    mkdir -p "$DIR/private" "$DIR/newcerts" "$DIR/clients"
    write_ca_config
    : >"$DIR/index.txt"
    echo "unique_subject = no" >"$DIR/index.txt.attr"
    echo 1000 >"$DIR/crlnumber"
    new_key "$DIR/private/ca.key"
    openssl req -new -x509 -config "$CNF" -extensions ca_ext -days "$CA_DAYS" \
        -key "$DIR/private/ca.key" -subj "/O=ensemble-stdp/CN=$CA_NAME" -out "$DIR/ca.crt"
    chmod 644 "$DIR/ca.crt"
    write_crl
    log "created CA $DIR/ca.crt"
fi
[[ -f $CNF ]] || write_ca_config
mkdir -p "$DIR/clients" "$DIR/newcerts"

# ---- server -----------------------------------------------------------------------------
if ((${#SERVER_NAMES[@]})); then
    san=""
    for name in "${SERVER_NAMES[@]}"; do
        if is_ip "$name"; then san+="${san:+,}IP:$name"; else san+="${san:+,}DNS:$name"; fi
    done
    if [[ -f $DIR/server.crt && $RENEW == 0 ]]; then
        # Same names: nothing to do. Other names: say so rather than silently keep the old.
        have=$(openssl x509 -in "$DIR/server.crt" -noout -ext subjectAltName | tail -n +2 |
            tr -d ' ' | sed 's/IPAddress:/IP:/g' | tr ',' '\n' | sort | paste -sd, -)
        want=$(echo "$san" | tr ',' '\n' | sort | paste -sd, -)
        [[ $have == "$want" ]] ||
            die "server.crt exists for $have, not $want: pass --renew to reissue it"
    else
        export ESTDP_SAN="$san"
        new_key "$DIR/server.key.new"
        openssl req -new -config "$CNF" -key "$DIR/server.key.new" \
            -subj "/O=ensemble-stdp/CN=${SERVER_NAMES[0]}" -out "$DIR/server.csr"
        sign "$DIR/server.csr" "$DIR/server.crt" server_ext
        mv "$DIR/server.key.new" "$DIR/server.key"
        rm -f "$DIR/server.csr"
        log "issued server certificate for $san"
    fi
fi

# ---- clients ----------------------------------------------------------------------------
export ESTDP_SAN="DNS:unused"
for id in "${CLIENTS[@]}"; do
    crt="$DIR/clients/$id.crt"
    key="$DIR/clients/$id.key"
    if [[ -f $crt && $RENEW == 0 ]]; then
        continue
    fi
    new_key "$key.new"
    openssl req -new -config "$CNF" -key "$key.new" -subj "/O=ensemble-stdp/CN=$id" -out "$DIR/clients/$id.csr"
    sign "$DIR/clients/$id.csr" "$crt" client_ext
    mv "$key.new" "$key"
    rm -f "$DIR/clients/$id.csr"
    log "issued client certificate $crt"
done

# ---- revocation -------------------------------------------------------------------------
if ((${#REVOKE[@]})); then
    for id in "${REVOKE[@]}"; do
        [[ -f $DIR/clients/$id.crt ]] || die "no client certificate for '$id' in $DIR/clients"
        # Revoke every still-valid certificate issued to this CN, not only the newest.
        while read -r serial; do
            openssl ca -batch -config "$CNF" -revoke "$DIR/newcerts/$serial.pem" \
                -crl_reason keyCompromise 2>"$DIR/.openssl.log" || {
                cat "$DIR/.openssl.log" >&2
                die "openssl could not revoke $serial"
            }
        done < <(awk -F'\t' -v cn="CN=$id" '$1 == "V" { n = split($6, rdn, "/"); for (i = 1; i <= n; i++) if (rdn[i] == cn) print $4 }' "$DIR/index.txt")
        mv "$DIR/clients/$id.crt" "$DIR/clients/$id.crt.revoked"
        rm -f "$DIR/clients/$id.key"
        log "revoked $id"
    done
    write_crl
    log "wrote $DIR/crl.pem: copy it to the broker and restart mosquitto"
fi
rm -f "$DIR/.openssl.log"
