#!/usr/bin/env bash
# Starts a real mail system for the integration tests, in a folder of its
# own, on loopback ports: Postfix (SMTP) delivering over LMTP into Dovecot
# (IMAP), with one account per address (password "secret").
#
#   mailservers.sh start DIR SMTP_PORT IMAP_PORT LMTP_PORT ADDRESS...
#   mailservers.sh stop DIR
#
# With SUBMISSION_PORT and AUTH_PORT set, Postfix also listens for
# submission on SUBMISSION_PORT as sites run it: STARTTLS required (a
# certificate for 127.0.0.1 from a CA made here, DIR/tls/ca.pem) and SASL
# AUTH through Dovecot's auth service (on AUTH_PORT), relaying only for a
# client that logged in. The port SMTP_PORT stays as it is: no AUTH offered.
#
# With PIPE_DOMAIN and PIPE_ALIASES set, Postfix also delivers mail for
# PIPE_DOMAIN locally, through the aliases file PIPE_ALIASES (e.g.
# ward: "|/usr/local/bin/hl7mail receive -config ..."), whose commands run
# as nobody.
#
# Needs root (both servers drop to their own users) and Debian's postfix,
# dovecot-imapd and dovecot-lmtpd (integration/deps.sh installs them).
set -euo pipefail

cmd=$1; dir=$(realpath -m "$2")
case "$cmd" in
stop)
  postfix -c "$dir/postfix" stop >/dev/null 2>&1 || true
  dovecot -c "$dir/dovecot/dovecot.conf" stop >/dev/null 2>&1 || true
  # Take this folder out of the default main.cf again.
  if cur=$(postconf -h alternate_config_directories 2>/dev/null); then
    rest=$(printf '%s\n' "$cur" | tr ',' '\n' | sed 's/^ *//; s/ *$//' | grep -vx "$dir/postfix" | grep . | paste -sd, - | sed 's/,/, /g' || true)
    postconf -e "alternate_config_directories = $rest"
  fi
  exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop DIR ..." >&2; exit 2 ;;
esac
smtp=$3; imap=$4; lmtp=$5; shift 5
mkdir -p "$dir/dovecot/run" "$dir/dovecot/state" "$dir/mail" "$dir/postfix"
chmod 755 "$dir" "$dir/dovecot" "$dir/mail"
chown nobody:nogroup "$dir/mail"

# Dovecot.
: > "$dir/dovecot/users"
domains=()
for a in "$@"; do
  echo "$a:{PLAIN}secret" >> "$dir/dovecot/users"
  domains+=("${a#*@}")
done
cat > "$dir/dovecot/dovecot.conf" <<CONF
base_dir = $dir/dovecot/run
state_dir = $dir/dovecot/state
log_path = $dir/dovecot/log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:$dir/mail/%u/Maildir
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $dir/dovecot/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$dir/mail/%u
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $imap
  }
  inet_listener imaps {
    port = 0
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp
  }
  unix_listener lmtp {
    mode = 0600
  }
}
protocol lmtp {
  auth_username_format = %u
}
CONF
if [ -n "${AUTH_PORT:-}" ]; then
  cat >> "$dir/dovecot/dovecot.conf" <<CONF
service auth {
  inet_listener {
    address = 127.0.0.1
    port = $AUTH_PORT
  }
}
CONF
fi
dovecot -c "$dir/dovecot/dovecot.conf" </dev/null >/dev/null 2>&1

# Postfix: a configuration directory of its own, which root may use only
# when the default main.cf names it.
grep -qs "^alternate_config_directories" /etc/postfix/main.cf || echo "alternate_config_directories =" >> /etc/postfix/main.cf
if ! postconf -h alternate_config_directories | tr ', ' '\n\n' | grep -qx "$dir/postfix"; then
  cur=$(postconf -h alternate_config_directories)
  postconf -e "alternate_config_directories = ${cur:+$cur, }$dir/postfix"
fi
sed "s/^smtp \+inet .*/127.0.0.1:$smtp inet n - n - - smtpd/" /etc/postfix/master.cf > "$dir/postfix/master.cf"
cat > "$dir/postfix/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $dir/postfix/queue
data_directory = $dir/postfix/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = $(printf '%s\n' "${domains[@]}" | sort -u | tr '\n' ' ')
virtual_transport = lmtp:inet:127.0.0.1:$lmtp
maillog_file_prefixes = $dir
maillog_file = $dir/postfix/log
smtputf8_enable = no
CONF
if [ -n "${PIPE_DOMAIN:-}" ]; then
  cp "$PIPE_ALIASES" "$dir/postfix/aliases"
  postconf -c "$dir/postfix" -e "mydestination = $PIPE_DOMAIN" "alias_maps = hash:$dir/postfix/aliases" \
    "alias_database = hash:$dir/postfix/aliases" 'local_recipient_maps = $alias_maps' "default_privs = nobody"
  postalias -c "$dir/postfix" "$dir/postfix/aliases"
fi
if [ -n "${SUBMISSION_PORT:-}" ]; then
  tls=$dir/tls
  mkdir -p "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=hl7mail test CA" -keyout "$tls/ca.key" \
    -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$tls/ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -days 2 \
    -extfile "$tls/ext" -out "$tls/server.pem" 2>/dev/null
  chmod 644 "$tls/ca.pem" "$tls/server.pem"
  postconf -c "$dir/postfix" -e "smtpd_tls_cert_file = $tls/server.pem" "smtpd_tls_key_file = $tls/server.key" \
    "smtpd_sasl_type = dovecot" "smtpd_sasl_path = inet:127.0.0.1:$AUTH_PORT"
  cat >> "$dir/postfix/master.cf" <<CONF
127.0.0.1:$SUBMISSION_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
CONF
fi
mkdir -p "$dir/postfix/queue" "$dir/postfix/data"
chown postfix "$dir/postfix/data"
postfix -c "$dir/postfix" check
postfix -c "$dir/postfix" start </dev/null >/dev/null 2>&1
for port in $smtp ${SUBMISSION_PORT:-}; do
  for i in $(seq 51); do
    [ "$i" = 51 ] && { echo "mailservers.sh: Postfix does not listen on 127.0.0.1:$port; see $dir/postfix/log" >&2; exit 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
done
exit 0
