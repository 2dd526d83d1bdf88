#!/usr/bin/env bash
# Prepare ./trial/ for compose.yaml: the lab's PKI (server named "server" in the compose network,
# and 127.0.0.1 for `flwr run` inside it), server.yaml, and per site (paris, nantes, berlin) its
# config, policy, CA, key and data (the demo heart-disease cohorts), approving the app's hash.
# Needs clinfed installed on the host (for `clinfed pki init` and `clinfed app-hash`).
# Run as root for rootful podman (files are handed to the images' user, uid 10001).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
trial="${TRIAL:-$here/trial}"
[ -e "$trial" ] && { echo "$trial exists; remove it first" >&2; exit 2; }

clinfed pki init --dir "$trial/pki" --server-host server --server-host 127.0.0.1 \
    --site paris --site nantes --site berlin >/dev/null
app_hash="$(clinfed app-hash "$repo")"

mkdir -p "$trial/server/sites"
cp -r "$trial/pki/server" "$trial/server/pki"
cat >"$trial/server/server.yaml" <<YAML
host: 0.0.0.0
port: 9093
certificate: pki/server.pem
private_key: pki/server-key.pem
ca_certificate: pki/ca.pem
database: /var/lib/clinfed/state/superlink.db
YAML

declare -A cohort=([paris]=cleveland [nantes]=hungary [berlin]=va-long-beach)
for site in paris nantes berlin; do
    etc="$trial/sites/$site/etc" data="$trial/sites/$site/data"
    mkdir -p "$etc/keys" "$data"
    cp "$trial/pki/sites/$site/auth-key.pub" "$trial/server/sites/$site.pub"
    cp "$trial/pki/sites/$site/ca.pem" "$etc/ca.pem"
    cp "$trial/pki/sites/$site/auth-key" "$etc/keys/auth-key"
    cp "$repo/conf/policies/demo-policy.yaml" "$etc/policy.yaml"
    cp "$repo/data/heart-disease/sites/${cohort[$site]}.csv" "$data/site.csv"
    cp "$repo/data/heart-disease/schema-binary.yaml" "$data/schema.yaml"
    chmod 444 "$data"/*
    cat >"$etc/site.yaml" <<YAML
name: $site
data: {path: /srv/clinfed/data/site.csv, schema: /srv/clinfed/data/schema.yaml}
privacy: {epsilon: 1.0, delta: 1.0e-5}
connection:
  superlink: server:9093
  root_certificates: /etc/clinfed/ca.pem
  auth_private_key: /etc/clinfed/keys/auth-key
approved_apps: ['$app_hash']
governance:
  policy: /etc/clinfed/policy.yaml
  ledger: /var/lib/clinfed/ledger.jsonl
  audit_log: /var/lib/clinfed/audit.jsonl
YAML
done
chown -R 10001:10001 "$trial/server" "$trial/sites"
echo "trial ready in $trial (app hash $app_hash); keep $trial/pki/ca/ca-key.pem offline"
