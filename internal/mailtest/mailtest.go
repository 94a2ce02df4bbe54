// Package mailtest holds what the tests of the mail side share: a router
// stand-in, a lab's configuration, a server certificate, a wait.
//
// It imports, of this module, only config, internal/testlog, store,
// surrogate; none of the mail side, whose tests all use it.
package mailtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// WaitFor waits up to 20 s for cond, and fails the test naming what it
// waited for.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ServerCert makes a certificate for 127.0.0.1 and a pool trusting it.
func ServerCert(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mail.test"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// Router is a stand-in HL7 router: a surrogate answering CA, with a store
// holding what it received.
type Router struct {
	Store *store.Store
	Srv   *surrogate.Server
	Addr  string
}

// StartRouter starts a Router on addr ("127.0.0.1:0" for any port); it
// stops at the end of the test.
func StartRouter(t testing.TB, addr string) *Router {
	t.Helper()
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := surrogate.New(surrogate.Options{Partner: "router", Spool: st, Logger: testlog.New(t, slog.LevelWarn)})
	ln, err := surrogate.Listen(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close(); st.Close() })
	return &Router{Store: st, Srv: srv, Addr: ln.Addr().String()}
}

// Received lists what the router received, newest first.
func (r *Router) Received(t testing.TB) []store.Message {
	t.Helper()
	list, err := r.Store.List(context.Background(), store.Filter{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// LabConfig is a lab's configuration with one partner, hospital, that
// sends unencrypted (security none), and the router at routerAddr; and an
// empty store, closed at the end of the test.
func LabConfig(t testing.TB, routerAddr string) (*config.Config, *store.Store) {
	t.Helper()
	cfg, err := config.Parse(filepath.Join(t.TempDir(), "partners.yaml"), []byte(fmt.Sprintf(`self: {name: Lab, email: lab@partner.test}
router: {addr: %s, ack_timeout: 300ms}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: hospital, listen: 127.0.0.1:9012, email: edi@hospital.test, security: none, allow_unencrypted: true}
`, routerAddr)))
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return cfg, st
}
