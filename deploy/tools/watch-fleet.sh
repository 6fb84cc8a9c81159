#!/usr/bin/env bash
# Watch a fleet from the broker: one JSON line per message on the round, global, status,
# metrics and update topics, decoded with estdp.protocol (models are summarised, not
# printed; a chunked model shows as one line per chunk). Connects as the read-only "operator" identity (deploy/broker/acl).
#
#   deploy/tools/watch-fleet.sh --host broker.lab --fleet lab \
#       --ca pki/ca.crt --cert pki/clients/operator.crt --key pki/clients/operator.key
#
# Needs mosquitto_sub (package mosquitto-clients) and a Python with estdp installed.
set -euo pipefail

PROG=$(basename "$0")
HOST=127.0.0.1
PORT=8883
FLEET=lab
CA=""
CERT=""
KEY=""
USERNAME=""
PASSWORD=${ESTDP_WATCH_PASSWORD:-}
COUNT=""
TIMEOUT=""
PYTHON=${PYTHON:-}

usage() {
    cat <<EOF
Usage: $PROG --ca CA.crt (--cert CRT --key KEY | --username USER) [options]

Options:
  --host HOST        broker host (default: $HOST)
  --port PORT        broker port (default: $PORT; 8884 for the password listener)
  --fleet NAME       fleet to watch (default: $FLEET)
  --ca FILE          CA certificate of the broker
  --cert FILE        client certificate (the operator identity)
  --key FILE         its private key
  --username USER    password login instead (password in \$ESTDP_WATCH_PASSWORD)
  --count N          exit after N messages
  --timeout S        exit after S seconds without a message
  --python PATH      Python with estdp installed (default: /opt/estdp/venv/bin/python,
                     else python3)
  -h, --help         show this help
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
        --host) HOST=${2:?--host needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --fleet) FLEET=${2:?--fleet needs a value}; shift 2 ;;
        --ca) CA=${2:?--ca needs a value}; shift 2 ;;
        --cert) CERT=${2:?--cert needs a value}; shift 2 ;;
        --key) KEY=${2:?--key needs a value}; shift 2 ;;
        --username) USERNAME=${2:?--username needs a value}; shift 2 ;;
        --count) COUNT=${2:?--count needs a value}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

command -v mosquitto_sub >/dev/null || die "mosquitto_sub is not installed (package mosquitto-clients)"
[[ -n $CA ]] || die "--ca is required"
if [[ -z $PYTHON ]]; then
    if [[ -x /opt/estdp/venv/bin/python ]]; then PYTHON=/opt/estdp/venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import estdp.protocol' 2>/dev/null || die "$PYTHON cannot import estdp (pass --python)"

args=(-h "$HOST" -p "$PORT" --cafile "$CA" -F '%I %t %x')
if [[ -n $CERT ]]; then
    args+=(--cert "$CERT" --key "${KEY:?--cert needs --key}")
elif [[ -n $USERNAME ]]; then
    args+=(-u "$USERNAME" -P "$PASSWORD")
else
    die "give --cert and --key, or --username"
fi
[[ -z $COUNT ]] || args+=(-C "$COUNT")
[[ -z $TIMEOUT ]] || args+=(-W "$TIMEOUT")
base="estdp/$FLEET"
# update/# and global/# include the chunks of models too large for one packet.
for topic in "$base/round" "$base/global/#" "$base/nodes/+/status" "$base/nodes/+/metrics" "$base/nodes/+/update/#"; do
    args+=(-t "$topic")
done

# Reads "time topic hexpayload" lines; prints one JSON object per message.
read -r -d '' DECODE <<'EOF' || true
import json, sys
from estdp.errors import ProtocolError
from estdp.protocol import decode, open_envelope

def model(m):
    return {"neurons": m.n_neurons, "inputs": m.n_input}

def summary(msg):
    out = {"kind": type(msg).__name__}
    for name in ("node_id", "round_id", "state", "detail", "images_seen", "target_size",
                 "neurons_per_node", "metric", "deadline_unix", "expected_nodes", "min_nodes"):
        if hasattr(msg, name):
            out[name] = getattr(msg, name)
    if hasattr(msg, "contains"):
        out["contains"] = list(msg.contains)
    if hasattr(msg, "metrics"):
        out["metrics"] = dict(msg.metrics)
    if hasattr(msg, "model"):
        out["model"] = model(msg.model)
    return out

for line in sys.stdin:
    stamp, topic, *rest = line.split()
    payload = bytes.fromhex(rest[0]) if rest else b""
    record = {"time": stamp, "topic": topic, "bytes": len(payload)}
    try:
        if not payload:
            record["kind"] = "cleared"
        elif (envelope := open_envelope(payload))[0] == "chunk":
            body = envelope[1]
            record.update(kind="chunk", index=body.get("index"), count=body.get("count"))
        else:
            record.update(summary(decode(payload)))
    except ProtocolError as exc:
        record["error"] = str(exc)
    print(json.dumps(record), flush=True)
EOF

mosquitto_sub "${args[@]}" | "$PYTHON" -c "$DECODE"
