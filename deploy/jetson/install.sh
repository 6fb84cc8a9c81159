#!/usr/bin/env bash
# Install an ensemble-stdp edge node as a systemd service on a Jetson board with JetPack 6
# (L4T R36, Ubuntu 22.04, Python 3.10, CUDA 12): a venv in /opt/estdp with the project and
# cupy-cuda12x, a system user "estdp" in group video, the node's certificate in
# /etc/estdp/certs, its settings in /etc/estdp/node.env, and estdp-node.service.
#
# Idempotent: running it again upgrades the package and the unit and keeps node.env
# (unless --force-env). JetPack 5 (L4T R35, Ubuntu 20.04, Python 3.8, CUDA 11.4) is not
# supported by this script: see docs/operations.md, "JetPack 5".
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

PREFIX=/opt/estdp
ETC=/etc/estdp
UNIT_DIR=/etc/systemd/system
SVC_USER=estdp
SOURCE=$REPO
CUPY_PACKAGE=cupy-cuda12x
NODE_ID=""
BROKER=""
FLEET=lab
CA=""
CERT=""
KEY=""
DATA=/var/lib/estdp/data
GPU=1
START=1
FORCE=0
FORCE_ENV=0
DRY_RUN=0

usage() {
    cat <<EOF
Usage: sudo $PROG --node-id ID --broker mqtts://HOST:8883 --ca CA.crt --cert ID.crt --key ID.key [options]

Install (or upgrade) the ensemble-stdp edge node service on a JetPack 6 board.

Required:
  --node-id ID        the node id; must equal the CN of the certificate
  --broker URL        the broker's mutual-TLS listener, e.g. mqtts://broker.lab:8883
  --ca FILE           the fleet CA certificate (ca.crt from make-certs.sh)
  --cert FILE         this node's certificate (clients/ID.crt)
  --key FILE          this node's private key (clients/ID.key)
Options:
  --fleet NAME        fleet name (default: $FLEET)
  --data DIR          where the board's data lives (default: $DATA)
  --source SPEC       what pip installs: a checkout, a wheel or a requirement
                      (default: this checkout, $REPO)
  --cupy PACKAGE      CuPy wheel to install (default: $CUPY_PACKAGE)
  --no-gpu            do not install CuPy (NumPy backend only)
  --no-start          install and enable, but do not start the service now
  --force-env         rewrite $ETC/node.env even if it exists
  --force             install on a board that does not look like JetPack 6
  --dry-run           print what would be done, change nothing
  -h, --help          show this help
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

log() {
    echo "$PROG: $*" >&2
}

# Every change to the system goes through run, so that --dry-run shows all of them.
run() {
    if ((DRY_RUN)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

while (($#)); do
    case $1 in
        --node-id) NODE_ID=${2:?--node-id needs a value}; shift 2 ;;
        --broker) BROKER=${2:?--broker needs a value}; shift 2 ;;
        --fleet) FLEET=${2:?--fleet needs a value}; shift 2 ;;
        --ca) CA=${2:?--ca needs a value}; shift 2 ;;
        --cert) CERT=${2:?--cert needs a value}; shift 2 ;;
        --key) KEY=${2:?--key needs a value}; shift 2 ;;
        --data) DATA=${2:?--data needs a value}; shift 2 ;;
        --source) SOURCE=${2:?--source needs a value}; shift 2 ;;
        --cupy) CUPY_PACKAGE=${2:?--cupy needs a value}; shift 2 ;;
        --no-gpu) GPU=0; shift ;;
        --no-start) START=0; shift ;;
        --force) FORCE=1; shift ;;
        --force-env) FORCE_ENV=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# ---- checks -----------------------------------------------------------------------------
[[ -n $NODE_ID ]] || die "--node-id is required"
[[ $NODE_ID =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "invalid node id '$NODE_ID': use 1-64 of A-Z a-z 0-9 _ . -"
[[ $FLEET =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "invalid fleet '$FLEET': use 1-64 of A-Z a-z 0-9 _ . -"
[[ $BROKER =~ ^mqtts?://[^/]+$ ]] || die "--broker must look like mqtts://HOST:PORT, got '$BROKER'"
[[ $BROKER == mqtts://* ]] || log "warning: $BROKER is not TLS; the production broker only listens with TLS"
for pair in "ca:$CA" "cert:$CERT" "key:$KEY"; do
    [[ -n ${pair#*:} ]] || die "--${pair%%:*} is required"
    [[ -r ${pair#*:} ]] || die "cannot read --${pair%%:*} file '${pair#*:}'"
done
if command -v openssl >/dev/null; then
    cn=$(openssl x509 -in "$CERT" -noout -subject -nameopt multiline | sed -n 's/^ *commonName *= *//p')
    [[ $cn == "$NODE_ID" ]] || die "the certificate's CN is '$cn', not the node id '$NODE_ID'"
    openssl verify -CAfile "$CA" "$CERT" >/dev/null || die "$CERT is not signed by $CA"
fi

if ((!DRY_RUN)) && ((EUID != 0)); then
    die "run as root (sudo), or with --dry-run"
fi

release=$(head -n 1 /etc/nv_tegra_release 2>/dev/null || true)
case $release in
    "# R36"*) ;;
    "# R35"* | "# R34"*)
        ((FORCE)) || die "this is JetPack 5 ($release): see docs/operations.md, \"JetPack 5\" (or pass --force)" ;;
    *)
        ((FORCE)) || die "not a JetPack 6 board (no R36 in /etc/nv_tegra_release); pass --force to install anyway" ;;
esac

# The system Python, not one from a user's PATH (pyenv, conda): the service outlives them.
PYTHON=${PYTHON:-/usr/bin/python3}
[[ -x $PYTHON ]] || die "$PYTHON is not installed (apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$("$PYTHON" -V) is too old: ensemble-stdp needs Python >= 3.10"

# ---- packages, user, venv ---------------------------------------------------------------
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    run apt-get update
    run apt-get install -y python3-venv python3-pip
fi

if ! id -u "$SVC_USER" >/dev/null 2>&1; then
    run useradd --system --home-dir /var/lib/estdp --no-create-home --shell /usr/sbin/nologin "$SVC_USER"
fi
# GPU device nodes on L4T belong to group video.
run usermod -a -G video "$SVC_USER"

[[ -x $PREFIX/venv/bin/python ]] || run "$PYTHON" -m venv "$PREFIX/venv"
run "$PREFIX/venv/bin/pip" install --upgrade pip
run "$PREFIX/venv/bin/pip" install --upgrade "$SOURCE"
if ((GPU)); then
    run "$PREFIX/venv/bin/pip" install --upgrade "$CUPY_PACKAGE"
fi
run install -d -m 0755 "$PREFIX/docs"
if [[ -f $REPO/docs/operations.md ]]; then
    run install -m 0644 "$REPO/docs/operations.md" "$PREFIX/docs/operations.md"
fi

# ---- certificates and settings ----------------------------------------------------------
run install -d -m 0750 -o root -g "$SVC_USER" "$ETC" "$ETC/certs"
run install -m 0644 -o root -g root "$CA" "$ETC/certs/ca.crt"
run install -m 0644 -o root -g root "$CERT" "$ETC/certs/node.crt"
run install -m 0640 -o root -g "$SVC_USER" "$KEY" "$ETC/certs/node.key"

env_text() {
    # The unit's ExecStart names these variables (deploy/systemd/node.env.example).
    sed -e "s|^ESTDP_BROKER=.*|ESTDP_BROKER=$BROKER|" \
        -e "s|^ESTDP_FLEET=.*|ESTDP_FLEET=$FLEET|" \
        -e "s|^ESTDP_NODE_ID=.*|ESTDP_NODE_ID=$NODE_ID|" \
        -e "s|^ESTDP_DATA=.*|ESTDP_DATA=$DATA|" \
        -e "s|^ESTDP_NODE_ARGS=.*|ESTDP_NODE_ARGS=--backend $([[ $GPU == 1 ]] && echo auto || echo numpy) --json|" \
        "$REPO/deploy/systemd/node.env.example"
}

if [[ -f $ETC/node.env && $FORCE_ENV == 0 ]]; then
    log "keeping $ETC/node.env (pass --force-env to rewrite it)"
elif ((DRY_RUN)); then
    echo "+ write $ETC/node.env:"
    env_text | sed 's/^/    /'
else
    env_text >"$ETC/node.env.new"
    chown "root:$SVC_USER" "$ETC/node.env.new"
    chmod 0640 "$ETC/node.env.new"
    mv "$ETC/node.env.new" "$ETC/node.env"
fi
run install -d -m 0750 -o "$SVC_USER" -g "$SVC_USER" "$DATA"

# ---- clock ------------------------------------------------------------------------------
# The unit orders itself After=time-sync.target, which waits for nothing unless a service
# such as systemd-time-wait-sync holds it back until NTP has set the clock; without it a
# board without an RTC battery starts TLS in the past ("certificate is not yet valid").
time_wait_sync=""
for dir in /lib/systemd/system /usr/lib/systemd/system; do
    [[ -e $dir/systemd-time-wait-sync.service ]] && time_wait_sync=1
done
if [[ -n $time_wait_sync ]]; then
    run systemctl enable systemd-time-wait-sync.service
else
    log "warning: no systemd-time-wait-sync.service here; with chrony, enable chrony-wait.service so that time-sync.target waits for the clock"
fi

# ---- service ----------------------------------------------------------------------------
run install -m 0644 "$REPO/deploy/systemd/estdp-node.service" "$UNIT_DIR/estdp-node.service"
run systemctl daemon-reload
run systemctl enable estdp-node.service
# The same test as the unit's ExecCondition: without training data the node cannot run.
have_data=""
if compgen -G "$DATA/train-images-idx3-ubyte*" >/dev/null && compgen -G "$DATA/train-labels-idx1-ubyte*" >/dev/null; then
    have_data=1
fi
if ((START)) && [[ -z $have_data ]]; then
    log "not starting estdp-node: no training data (train-images/train-labels IDX files) in $DATA yet; copy them there, then: systemctl start estdp-node"
elif ((START)); then
    run systemctl restart estdp-node.service
fi

if ((GPU)) && ((!DRY_RUN)); then
    # A wheel that cannot see the GPU still installs: say so now rather than in the logs.
    if runuser -u "$SVC_USER" -- "$PREFIX/venv/bin/python" -c \
        'import cupy; cupy.cuda.runtime.getDeviceCount(); print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())' \
        >/dev/null 2>&1; then
        log "CuPy sees the GPU"
    else
        log "warning: CuPy cannot use the GPU as user $SVC_USER; the node will fall back to NumPy (--backend auto)"
    fi
fi
log "done: systemctl status estdp-node; journalctl -u estdp-node -f"
