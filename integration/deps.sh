#!/usr/bin/env bash
# Installs the outside programs the tests run against, from Debian's
# packages, when they are missing: python3-hl7 (mllp_send and an asyncio MLLP
# server), GnuPG, OpenSSL, Postfix with Dovecot (IMAP and LMTP), which
# integration/mailservers.sh starts in a folder of their own, and Chromium
# with ChromeDriver for the dashboard's browser test, Prometheus for
# promtool, which checks the alerting rules, systemd for
# systemd-analyze, which checks the units the package installs, and
# PostgreSQL, of which internal/pgtest starts throwaway clusters. Needs root (or sudo) when anything is missing;
# exits non-zero when a package cannot be installed, so that the tests fail
# rather than skip.
set -euo pipefail

declare -A need=(
  [/usr/bin/mllp_send]=python3-hl7
  [/usr/bin/gpg]=gnupg
  [/usr/bin/openssl]=openssl
  [/usr/sbin/postfix]=postfix
  [/usr/lib/dovecot/imap]=dovecot-imapd
  [/usr/lib/dovecot/lmtp]=dovecot-lmtpd
  [/usr/bin/chromium]=chromium
  [/usr/bin/chromedriver]=chromium-driver
  [/usr/bin/promtool]=prometheus
  [/usr/bin/systemd-analyze]=systemd
)
missing=()
for path in "${!need[@]}"; do
  [ -x "$path" ] || missing+=("${need[$path]}")
done
# PostgreSQL's programs live under their version's folder.
pg_initdb() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
pg_initdb || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "integration/deps.sh: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "integration/deps.sh: need root to install ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix without a system configuration: the tests give it their own.
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
# Their services are not started: the tests start what they need in
# folders of their own, on loopback ports.
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 755 /usr/sbin/policy-rc.d
  policy=/usr/sbin/policy-rc.d
fi
trap '[ -z "$policy" ] || $sudo rm -f "$policy"' EXIT
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
for path in "${!need[@]}"; do
  [ -x "$path" ] || { echo "integration/deps.sh: $path still missing after install" >&2; exit 1; }
done
pg_initdb || { echo "integration/deps.sh: /usr/lib/postgresql/*/bin/initdb still missing after install" >&2; exit 1; }
