package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// TestPrivateCA: the SMTP server's certificate comes from a private CA.
// Without smtp.ca_file the certificate is refused and the message waits;
// with it, the mail goes out. Verification is never switched off.
func TestPrivateCA(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "Hospital private CA"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	srv := &embedded.SMTP{TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}}
	smtpAddr, err := srv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	dir := t.TempDir()
	self, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test"})
	priv, _ := security.ArmorPGPPrivate(self, nil)
	pub, _ := security.ArmorPGPPublic(lab)
	os.WriteFile(filepath.Join(dir, "self.asc"), priv, 0o600)
	os.WriteFile(filepath.Join(dir, "lab.asc"), pub, 0o600)
	os.WriteFile(filepath.Join(dir, "ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	listen := freeAddr(t)
	run := func(caFile string) int {
		t.Helper()
		path := filepath.Join(dir, "partners.yaml")
		os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: h, email: edi@hospital.test, pgp_key: self.asc}
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: %s, tls: starttls%s}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: lab.asc}
`, smtpAddr, caFile, listen)), 0o600)
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := cfg.CheckFiles(); err != nil {
			t.Fatal(err)
		}
		keys, _ := LoadKeys(cfg, time.Now())
		g, err := Start(context.Background(), Options{Config: cfg, Keys: keys, Logger: testlog.New(t, slog.LevelInfo),
			RetryBase: 50 * time.Millisecond, NoDashboard: true})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Shutdown(context.Background())
		if caFile == "" {
			c, err := mllp.Dial(context.Background(), listen)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			reply, err := c.Send(ctx, []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|ca1|P|2.3|||AL\rPID|1\r"))
			cancel()
			c.Close()
			if a, perr := hl7.ParseAck(reply); err != nil || perr != nil || a.Code != hl7.CommitAccept {
				t.Fatalf("ACK %q, %v", reply, err)
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			st := g.SMTPStatus()
			if caFile == "" && st.State == "down" {
				if !strings.Contains(st.LastError, "certificate signed by unknown authority") {
					t.Errorf("SMTP error without the CA file: %s", st.LastError)
				}
				m, _ := g.Store().List(context.Background(), store.Filter{})
				if len(m) != 1 || m[0].State != store.Queued {
					t.Errorf("message after a refused certificate: %+v", m)
				}
				return srv.Count()
			}
			if caFile != "" && srv.Count() == 1 {
				return 1
			}
			if time.Now().After(deadline) {
				t.Fatalf("after 10s: SMTP %+v, %d mails", st, srv.Count())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if n := run(""); n != 0 {
		t.Fatalf("a mail went out to an untrusted certificate")
	}
	if n := run(", ca_file: ca.pem"); n != 1 {
		t.Fatalf("with the CA file: %d mails", n)
	}
}
