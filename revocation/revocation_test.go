package revocation

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ocsp"

	"github.com/hl7mail/hl7mail/security"
)

type ca struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newCA(t *testing.T) *ca {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &ca{c, key}
}

func (a *ca) issue(t *testing.T, serial int64, ocspURL, crlURL string) *x509.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "lab"},
		EmailAddresses: []string{"lab@l.test"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	if ocspURL != "" {
		tmpl.OCSPServer = []string{ocspURL}
	}
	if crlURL != "" {
		tmpl.CRLDistributionPoints = []string{crlURL}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func (a *ca) crl(t *testing.T, next time.Duration, revoked ...int64) *x509.RevocationList {
	var entries []x509.RevocationListEntry
	for _, s := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: big.NewInt(s), RevocationTime: time.Now().Add(-time.Minute)})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(time.Now().UnixNano()),
		ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(next), RevokedCertificateEntries: entries}, a.cert, a.key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := parseCRL(der)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestCRLFile(t *testing.T) {
	a := newCA(t)
	good, bad := a.issue(t, 10, "", ""), a.issue(t, 11, "", "")
	now := time.Now()
	c := New(Options{CRLs: []*x509.RevocationList{a.crl(t, time.Hour, 11)}})
	if err := c.Check(good, a.cert, now); err != nil {
		t.Errorf("not listed: %v", err)
	}
	if err := c.Check(bad, a.cert, now); !errors.Is(err, security.ErrRevoked) {
		t.Errorf("listed: %v, want revoked", err)
	}
	// After the CRL's next update, fail closed cannot tell; fail open can.
	if err := c.Check(good, a.cert, now.Add(2*time.Hour)); !errors.Is(err, security.ErrRevocationUnknown) {
		t.Errorf("stale CRL, fail closed: %v, want unknown", err)
	}
	open := New(Options{CRLs: []*x509.RevocationList{a.crl(t, time.Hour, 11)}, FailOpen: true})
	if err := open.Check(good, a.cert, now.Add(2*time.Hour)); err != nil {
		t.Errorf("stale CRL, fail open: %v", err)
	}
	// Another CA's CRL says nothing of this one's certificates.
	other := newCA(t)
	c = New(Options{CRLs: []*x509.RevocationList{other.crl(t, time.Hour, 11)}})
	if err := c.Check(bad, a.cert, now); !errors.Is(err, security.ErrRevocationUnknown) {
		t.Errorf("only another CA's CRL: %v, want unknown", err)
	}
}

// responder answers OCSP for a's certificates, revoked ones as revoked,
// with answers valid for life; down makes it answer 503.
type responder struct {
	a       *ca
	revoked map[int64]bool
	life    time.Duration
	down    atomic.Bool
	asked   atomic.Int32
	ahead   atomic.Int64 // the responder's clock ahead of the real one, as the test's is
	embed   bool         // send the CA's own certificate with each answer, as openssl ocsp does
}

func (r *responder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.asked.Add(1)
	if r.down.Load() {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	body, _ := io.ReadAll(req.Body)
	q, err := ocsp.ParseRequest(body)
	if err != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	now := time.Now().Add(time.Duration(r.ahead.Load()))
	tmpl := ocsp.Response{Status: ocsp.Good, SerialNumber: q.SerialNumber, ThisUpdate: now.Add(-time.Minute),
		NextUpdate: now.Add(r.life)}
	if r.embed {
		tmpl.Certificate = r.a.cert
	}
	if r.revoked[q.SerialNumber.Int64()] {
		tmpl.Status, tmpl.RevokedAt = ocsp.Revoked, time.Now().Add(-time.Minute)
	}
	der, err := ocsp.CreateResponse(r.a.cert, r.a.cert, tmpl, r.a.key)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/ocsp-response")
	w.Write(der)
}

func TestOCSP(t *testing.T) {
	a := newCA(t)
	r := &responder{a: a, revoked: map[int64]bool{21: true}, life: time.Hour}
	srv := httptest.NewServer(r)
	defer srv.Close()
	good, bad := a.issue(t, 20, srv.URL, ""), a.issue(t, 21, srv.URL, "")
	now := time.Now()
	c := New(Options{Fetch: true})
	if err := c.Check(good, a.cert, now); err != nil {
		t.Errorf("good: %v", err)
	}
	if err := c.Check(bad, a.cert, now); !errors.Is(err, security.ErrRevoked) {
		t.Errorf("revoked: %v", err)
	}
	// Cached: no second question while the answer is fresh.
	before := r.asked.Load()
	if err := c.Check(good, a.cert, now.Add(time.Minute)); err != nil || r.asked.Load() != before {
		t.Errorf("cached answer: %v, asked %d more", err, r.asked.Load()-before)
	}
	// The responder goes down: the cached answer holds until it runs out.
	r.down.Store(true)
	if err := c.Check(good, a.cert, now.Add(58*time.Minute)); err != nil {
		t.Errorf("responder down, answer still current: %v", err)
	}
	if err := c.Check(good, a.cert, now.Add(2*time.Hour)); !errors.Is(err, security.ErrRevocationUnknown) {
		t.Errorf("responder down, answer ran out: %v, want unknown", err)
	}
	// Mended: answered again (after the wait for a failed fetch).
	r.down.Store(false)
	r.ahead.Store(int64(2*time.Hour + time.Minute))
	if err := c.Check(good, a.cert, now.Add(2*time.Hour+time.Minute)); err != nil {
		t.Errorf("responder back: %v", err)
	}
}

// TestOCSPSignedByTheCA: answers the CA signed itself, its certificate
// sent along, are believed; those of another CA's key are not.
func TestOCSPSignedByTheCA(t *testing.T) {
	a := newCA(t)
	r := &responder{a: a, revoked: map[int64]bool{41: true}, life: time.Hour, embed: true}
	srv := httptest.NewServer(r)
	defer srv.Close()
	c := New(Options{Fetch: true})
	if err := c.Check(a.issue(t, 40, srv.URL, ""), a.cert, time.Now()); err != nil {
		t.Errorf("good: %v", err)
	}
	if err := c.Check(a.issue(t, 41, srv.URL, ""), a.cert, time.Now()); !errors.Is(err, security.ErrRevoked) {
		t.Errorf("revoked: %v", err)
	}
	// Another CA answers, sending its own certificate: not the issuer.
	srv2 := httptest.NewServer(&responder{a: newCA(t), life: time.Hour, embed: true})
	defer srv2.Close()
	if err := New(Options{Fetch: true}).Check(a.issue(t, 42, srv2.URL, ""), a.cert, time.Now()); !errors.Is(err, security.ErrRevocationUnknown) {
		t.Errorf("answered by another CA: %v, want unknown", err)
	}
}

// TestCachedAsksNobody: the cached view answers from what Check fetched,
// and says "unknown" for what nobody asked yet, without asking.
func TestCachedAsksNobody(t *testing.T) {
	a := newCA(t)
	r := &responder{a: a, revoked: map[int64]bool{51: true}, life: time.Hour}
	srv := httptest.NewServer(r)
	defer srv.Close()
	good, bad := a.issue(t, 50, srv.URL, ""), a.issue(t, 51, srv.URL, "")
	c := New(Options{Fetch: true})
	view := c.Cached()
	if err := view.Check(good, a.cert, time.Now()); !errors.Is(err, security.ErrRevocationUnknown) || r.asked.Load() != 0 {
		t.Errorf("before any check: %v, responder asked %d times", err, r.asked.Load())
	}
	c.Check(good, a.cert, time.Now())
	c.Check(bad, a.cert, time.Now())
	asked := r.asked.Load()
	if err := view.Check(good, a.cert, time.Now()); err != nil {
		t.Errorf("good, cached: %v", err)
	}
	if err := view.Check(bad, a.cert, time.Now()); !errors.Is(err, security.ErrRevoked) {
		t.Errorf("revoked, cached: %v", err)
	}
	if r.asked.Load() != asked {
		t.Errorf("the cached view asked the responder")
	}
}

func TestCRLDistributionPoint(t *testing.T) {
	a := newCA(t)
	var crlDER atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(crlDER.Load().([]byte)) }))
	defer srv.Close()
	crlDER.Store(a.crl(t, time.Hour, 31).Raw)
	good, bad := a.issue(t, 30, "", srv.URL+"/ca.crl"), a.issue(t, 31, "", srv.URL+"/ca.crl")
	c := New(Options{Fetch: true})
	if err := c.Check(good, a.cert, time.Now()); err != nil {
		t.Errorf("good: %v", err)
	}
	if err := c.Check(bad, a.cert, time.Now()); !errors.Is(err, security.ErrRevoked) {
		t.Errorf("revoked: %v", err)
	}
	// A CRL signed by someone else is not believed.
	crlDER.Store(newCA(t).crl(t, time.Hour).Raw)
	c = New(Options{Fetch: true})
	if err := c.Check(bad, a.cert, time.Now()); !errors.Is(err, security.ErrRevocationUnknown) {
		t.Errorf("a CRL of another signer: %v, want unknown", err)
	}
}
