#!/usr/bin/env bash
# Start the service on the default model (SmolLM2-135M-Instruct), show the manual's curl example
# answering, then keep serving until Ctrl-C. Extra arguments are Hydra overrides for `python -m chitu`.
set -euo pipefail
PORT="${PORT:-21002}"
python -m chitu serve.port="$PORT" "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"' INT TERM
until curl -sf "localhost:$PORT/health" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "the service failed to start" >&2; exit 1; }
    sleep 1
done
curl -s "localhost:$PORT/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -d '{
    "messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "What is machine learning?"}
    ]
  }'
echo
echo "Serving on localhost:$PORT (Ctrl-C stops)"
wait "$server"
