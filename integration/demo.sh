#!/usr/bin/env bash
# make demo: the outbound front door on this machine, nothing else needed.
# Starts hl7mail serve with a throw-away configuration, sends ten messages of
# the sample corpus to the tucker-lab surrogate with "hl7mail send", shows the
# ACKs and the stored messages, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/bin/hl7mail
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT

cat >"$dir/partners.yaml" <<YAML
self: {name: demo-hospital, email: edi@hospital.test}
store: var
router: {addr: 127.0.0.1:16661}
smtp: {addr: 127.0.0.1:12525, tls: none}
imap: {addr: 127.0.0.1:11143, tls: none}
dashboard: {addr: 127.0.0.1:18025}
partners:
  - {name: tucker-lab, listen: 127.0.0.1:19012, email: lab@partner.test, security: none, allow_unencrypted: true}
YAML

echo "== hl7mail check"
"$bin" check -config "$dir/partners.yaml"
echo "== hl7mail serve (log in $dir/serve.log)"
"$bin" serve -config "$dir/partners.yaml" -log-format text 2>"$dir/serve.log" &
pid=$!
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/19012) 2>/dev/null && break
  sleep 0.1
done
corpus=../shared/testdata/hl7/simhospital-messages.hl7
awk 'BEGIN{RS="\n\n"} NR<=10 {print; print ""}' "$corpus" >"$dir/ten.hl7"
echo "== hl7mail send: ten messages to the tucker-lab surrogate, each answered once stored"
"$bin" send -addr 127.0.0.1:19012 "$dir/ten.hl7" | grep -E '^(# |MSA|[0-9]+ sent)'
echo "== hl7mail messages"
"$bin" messages -config "$dir/partners.yaml"
kill -TERM $pid; wait $pid || true
echo "== serve log (no payloads, no patient data)"
cat "$dir/serve.log"
