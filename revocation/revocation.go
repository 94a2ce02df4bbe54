// Package revocation tells whether an S/MIME certificate is revoked
// (draft-ietf-ediint-hl7-02 §4.2.4, §4.3.4): by CRLs read from files
// (RFC 5280 §5), and, when fetching is on, by the certificate's own OCSP
// responder (RFC 6960, over HTTP as RFC 5019 profiles it) and CRL
// distribution points. Every answer is cached until its next update and
// refreshed in the last tenth of its life; an answer that cannot be
// refreshed is kept until it runs out. Then "cannot tell" refuses the
// certificate (fail closed, the default) or is logged and accepted (fail
// open).
//
// The OCSP protocol is golang.org/x/crypto/ocsp's, CRLs crypto/x509's.
//
// It imports, of this module, security.
package revocation

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ocsp"

	"github.com/hl7mail/hl7mail/security"
)

// Options configure a Checker.
type Options struct {
	// CRLs are CRLs read from files (LoadCRL).
	CRLs []*x509.RevocationList
	// Fetch asks the certificate's OCSP responder and fetches its CRL
	// distribution points.
	Fetch bool
	// FailOpen accepts a certificate whose status cannot be told (and
	// logs it); by default it is refused.
	FailOpen bool
	// Client fetches; default: a client with a 10 s timeout.
	Client *http.Client
	// Log, when set, is told of answers that could not be had.
	Log *slog.Logger
}

// A Checker answers security.RevocationChecker. It is safe for concurrent
// use; fetches for one certificate are made one at a time.
type Checker struct {
	o Options

	mu    sync.Mutex
	ocsp  map[string]*ocsp.Response       // by issuer key hash and serial
	crls  map[string]*x509.RevocationList // fetched, by URL
	locks map[string]*sync.Mutex          // one fetch per key at a time
	fails map[string]time.Time            // last failed fetch, by key
	told  map[string]time.Time            // last fail-open warning, by certificate
}

var _ security.RevocationChecker = (*Checker)(nil)

// New returns a Checker.
func New(o Options) *Checker {
	if o.Client == nil {
		o.Client = &http.Client{Timeout: 10 * time.Second}
	}
	return &Checker{o: o, ocsp: map[string]*ocsp.Response{}, crls: map[string]*x509.RevocationList{},
		locks: map[string]*sync.Mutex{}, fails: map[string]time.Time{}, told: map[string]time.Time{}}
}

// SetLog sets the log told of answers that could not be had; call it
// before the first Check.
func (c *Checker) SetLog(l *slog.Logger) { c.o.Log = l }

// LoadCRL reads a CRL file, PEM or DER.
func LoadCRL(path string) (*x509.RevocationList, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	crl, err := parseCRL(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return crl, nil
}

func parseCRL(data []byte) (*x509.RevocationList, error) {
	if b, _ := pem.Decode(data); b != nil {
		if b.Type != "X509 CRL" {
			return nil, fmt.Errorf("PEM block %s, want X509 CRL", b.Type)
		}
		data = b.Bytes
	}
	crl, err := x509.ParseRevocationList(data)
	if err != nil {
		return nil, fmt.Errorf("not a CRL: %v", err)
	}
	return crl, nil
}

// retryFailed is how long a failed fetch is not tried again.
const retryFailed = 30 * time.Second

// Check returns nil when cert, issued by issuer, is not revoked at now,
// an error wrapping security.ErrRevoked when it is, and one wrapping
// security.ErrRevocationUnknown when that cannot be told (fail closed).
func (c *Checker) Check(cert, issuer *x509.Certificate, now time.Time) error {
	return c.check(cert, issuer, now, true)
}

// Cached is the checker as a security.RevocationChecker that asks nobody:
// CRL files and the answers cached by earlier checks only. What looks at
// keys without a mail waiting on it (the key table, metrics) uses it, so
// that a slow responder never holds up a page or a scrape.
func (c *Checker) Cached() security.RevocationChecker { return cachedView{c} }

type cachedView struct{ c *Checker }

func (v cachedView) Check(cert, issuer *x509.Certificate, now time.Time) error {
	return v.c.check(cert, issuer, now, false)
}

func (c *Checker) check(cert, issuer *x509.Certificate, now time.Time, fetch bool) error {
	name := security.CertName(cert)
	answered := false
	// CRL files first: no network, and the operator put them there.
	for _, crl := range c.o.CRLs {
		if !issuedBy(crl, issuer) || !current(crl.ThisUpdate, crl.NextUpdate, now) {
			continue
		}
		if at, ok := listed(crl, cert.SerialNumber); ok {
			return fmt.Errorf("%w: %s, revoked on %s (CRL file)", security.ErrRevoked, name, at.Format(time.DateOnly))
		}
		answered = true
	}
	if answered {
		return nil
	}
	var why []string
	if c.o.Fetch {
		if len(cert.OCSPServer) > 0 {
			r, err := c.ocspAnswer(cert, issuer, now, fetch)
			switch {
			case err != nil:
				why = append(why, err.Error())
			case r.Status == ocsp.Revoked:
				return fmt.Errorf("%w: %s, revoked on %s (OCSP)", security.ErrRevoked, name, r.RevokedAt.Format(time.DateOnly))
			case r.Status == ocsp.Good:
				return nil
			default:
				why = append(why, "the OCSP responder does not know the certificate")
			}
		}
		for _, url := range cert.CRLDistributionPoints {
			crl, err := c.fetchedCRL(url, issuer, now, fetch)
			if err != nil {
				why = append(why, err.Error())
				continue
			}
			if at, ok := listed(crl, cert.SerialNumber); ok {
				return fmt.Errorf("%w: %s, revoked on %s (CRL)", security.ErrRevoked, name, at.Format(time.DateOnly))
			}
			return nil
		}
		if len(cert.OCSPServer) == 0 && len(cert.CRLDistributionPoints) == 0 {
			why = append(why, "the certificate names no OCSP responder and no CRL distribution point")
		}
	}
	if len(why) == 0 {
		why = append(why, "no current CRL of its issuer")
	}
	reason := strings.Join(why, "; ")
	if c.o.FailOpen {
		if c.o.Log != nil && fetch && c.firstIn(name, 10*time.Minute, now) {
			c.o.Log.Warn("revocation cannot be told; accepted (revocation.fail: open)", "certificate", name, "why", reason)
		}
		return nil
	}
	return fmt.Errorf("%w: %s: %s", security.ErrRevocationUnknown, name, reason)
}

// CanAsk reports whether anything can answer for cert, issued by issuer:
// a CRL file of the issuer's, or, with fetching on, an HTTP OCSP responder
// or CRL distribution point named in the certificate. With fail closed, a
// certificate nothing can answer for is refused: check warns of it.
func (c *Checker) CanAsk(cert, issuer *x509.Certificate) bool {
	for _, crl := range c.o.CRLs {
		if issuedBy(crl, issuer) {
			return true
		}
	}
	if !c.o.Fetch {
		return false
	}
	for _, u := range append(append([]string{}, cert.OCSPServer...), cert.CRLDistributionPoints...) {
		if strings.HasPrefix(u, "http://") || strings.HasPrefix(u, "https://") {
			return true
		}
	}
	return false
}

// issuedBy reports whether crl is issuer's, by name and signature.
func issuedBy(crl *x509.RevocationList, issuer *x509.Certificate) bool {
	return bytes.Equal(crl.RawIssuer, issuer.RawSubject) && crl.CheckSignatureFrom(issuer) == nil
}

// current reports whether an answer made at this and due again at next is
// still the current one at now (a missing next update: a day).
func current(this, next, now time.Time) bool {
	if next.IsZero() {
		next = this.Add(24 * time.Hour)
	}
	return !now.Before(this.Add(-5*time.Minute)) && now.Before(next)
}

// fresh reports whether an answer needs no refresh yet: not in the last
// tenth of its life.
func fresh(this, next, now time.Time) bool {
	if next.IsZero() {
		next = this.Add(24 * time.Hour)
	}
	return current(this, next, now) && now.Before(next.Add(-next.Sub(this)/10))
}

func listed(crl *x509.RevocationList, serial *big.Int) (time.Time, bool) {
	for _, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber.Cmp(serial) == 0 {
			return e.RevocationTime, true
		}
	}
	return time.Time{}, false
}

// firstIn reports whether name was not told of within the last d: a
// fail-open warning once in a while, not at every mail and every look.
func (c *Checker) firstIn(name string, d time.Duration, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if at, ok := c.told[name]; ok && now.Sub(at) < d && now.Sub(at) >= 0 {
		return false
	}
	c.told[name] = now
	return true
}

// lock serializes fetches for key.
func (c *Checker) lock(key string) func() {
	c.mu.Lock()
	l, ok := c.locks[key]
	if !ok {
		l = &sync.Mutex{}
		c.locks[key] = l
	}
	c.mu.Unlock()
	l.Lock()
	return l.Unlock
}

// cached returns what is cached under key in m, and whether a fetch is
// due (not fresh, and no failed fetch in the last retryFailed).
func cached[T any](c *Checker, m map[string]T, key string, times func(T) (time.Time, time.Time), now time.Time) (T, bool, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := m[key]
	var this, next time.Time
	if ok {
		this, next = times(v)
	}
	isCurrent := ok && current(this, next, now)
	due := !ok || !fresh(this, next, now)
	if due {
		if at, failed := c.fails[key]; failed && now.Sub(at) < retryFailed && now.Sub(at) >= 0 {
			due = false
		}
	}
	return v, isCurrent, due
}

func (c *Checker) ocspAnswer(cert, issuer *x509.Certificate, now time.Time, fetch bool) (*ocsp.Response, error) {
	key := "ocsp:" + string(issuer.RawSubjectPublicKeyInfo) + ":" + cert.SerialNumber.String()
	times := func(r *ocsp.Response) (time.Time, time.Time) { return r.ThisUpdate, r.NextUpdate }
	if r, isCurrent, due := cached(c, c.ocsp, key, times, now); isCurrent && (!due || !fetch) {
		return r, nil
	} else if !fetch {
		return nil, errors.New("no current OCSP answer asked for yet")
	}
	defer c.lock(key)()
	r, isCurrent, due := cached(c, c.ocsp, key, times, now)
	if !due && isCurrent {
		return r, nil
	}
	var err error
	if due {
		var got *ocsp.Response
		if got, err = c.askOCSP(cert, issuer); err == nil && !current(got.ThisUpdate, got.NextUpdate, now) {
			err = fmt.Errorf("OCSP responder: its answer is not current (this update %s, next %s)",
				got.ThisUpdate.Format(time.RFC3339), got.NextUpdate.Format(time.RFC3339))
		}
		if err == nil {
			c.mu.Lock()
			c.ocsp[key] = got
			delete(c.fails, key)
			c.mu.Unlock()
			return got, nil
		}
		c.failed(key, now, err)
	}
	if isCurrent {
		return r, nil // the refresh failed; the cached answer holds until it runs out
	}
	if err == nil {
		err = errors.New("the OCSP responder failed a moment ago")
	}
	return nil, err
}

func (c *Checker) failed(key string, now time.Time, err error) {
	c.mu.Lock()
	c.fails[key] = now
	c.mu.Unlock()
	if c.o.Log != nil {
		c.o.Log.Warn("revocation answer not had", "err", err)
	}
}

// askOCSP asks the certificate's first HTTP OCSP responder.
func (c *Checker) askOCSP(cert, issuer *x509.Certificate) (*ocsp.Response, error) {
	url := ""
	for _, u := range cert.OCSPServer {
		if strings.HasPrefix(u, "http://") || strings.HasPrefix(u, "https://") {
			url = u
			break
		}
	}
	if url == "" {
		return nil, errors.New("the certificate names no HTTP OCSP responder")
	}
	req, err := ocsp.CreateRequest(cert, issuer, nil)
	if err != nil {
		return nil, fmt.Errorf("OCSP request: %v", err)
	}
	body, err := c.post(url, req)
	if err != nil {
		return nil, fmt.Errorf("OCSP responder %s: %v", url, err)
	}
	r, err := ocsp.ParseResponseForCert(body, cert, issuer)
	if err != nil {
		// The CA may sign its answers itself and send its own certificate
		// with them (RFC 6960 §4.2.2.2; "openssl ocsp -rsigner" with the
		// CA's). x/crypto/ocsp takes a certificate sent along for a
		// delegated responder's and wants the CA's signature on it: the
		// answer is verified here with the certificate sent, accepted
		// when that certificate is the issuer itself.
		if r2, err2 := ocsp.ParseResponseForCert(body, cert, nil); err2 == nil && r2.Certificate != nil &&
			bytes.Equal(r2.Certificate.Raw, issuer.Raw) {
			return r2, nil
		}
		return nil, fmt.Errorf("OCSP responder %s: its answer is not valid: %v", url, err)
	}
	return r, nil
}

// maxAnswer bounds an OCSP answer or a fetched CRL.
const maxAnswer = 16 << 20

func (c *Checker) post(to string, req []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.o.Client.Timeout+time.Second)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, to, bytes.NewReader(req))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Content-Type", "application/ocsp-request")
	return c.do(hr)
}

func (c *Checker) do(hr *http.Request) ([]byte, error) {
	resp, err := c.o.Client.Do(hr)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			return nil, ue.Err // the URL is named by the caller
		}
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err != nil {
		return nil, fmt.Errorf("reading the answer: %v", err)
	}
	if len(body) > maxAnswer {
		return nil, fmt.Errorf("answer larger than %d bytes", maxAnswer)
	}
	return body, nil
}

// fetchedCRL returns the current CRL at url, fetched or cached.
func (c *Checker) fetchedCRL(url string, issuer *x509.Certificate, now time.Time, fetch bool) (*x509.RevocationList, error) {
	if !strings.HasPrefix(url, "http://") {
		return nil, fmt.Errorf("CRL distribution point %s: only http:// is fetched (RFC 5280 §4.2.1.13)", url)
	}
	key := "crl:" + url
	times := func(l *x509.RevocationList) (time.Time, time.Time) { return l.ThisUpdate, l.NextUpdate }
	if l, isCurrent, due := cached(c, c.crls, key, times, now); isCurrent && (!due || !fetch) {
		return l, nil
	} else if !fetch {
		return nil, fmt.Errorf("CRL %s: not fetched yet", url)
	}
	defer c.lock(key)()
	l, isCurrent, due := cached(c, c.crls, key, times, now)
	if !due && isCurrent {
		return l, nil
	}
	var err error
	if due {
		var got *x509.RevocationList
		if got, err = c.getCRL(url, issuer); err == nil {
			c.mu.Lock()
			c.crls[key] = got
			delete(c.fails, key)
			c.mu.Unlock()
			if current(got.ThisUpdate, got.NextUpdate, now) {
				return got, nil
			}
			return nil, fmt.Errorf("CRL %s: its next update %s has passed", url, got.NextUpdate.Format(time.RFC3339))
		}
		c.failed(key, now, err)
	}
	if isCurrent {
		return l, nil
	}
	if err == nil {
		err = fmt.Errorf("CRL %s: the fetch failed a moment ago", url)
	}
	return nil, err
}

func (c *Checker) getCRL(url string, issuer *x509.Certificate) (*x509.RevocationList, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.o.Client.Timeout+time.Second)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	body, err := c.do(hr)
	if err != nil {
		return nil, fmt.Errorf("CRL %s: %v", url, err)
	}
	crl, err := parseCRL(body)
	if err != nil {
		return nil, fmt.Errorf("CRL %s: %v", url, err)
	}
	if !issuedBy(crl, issuer) {
		return nil, fmt.Errorf("CRL %s: not signed by the certificate's issuer", url)
	}
	return crl, nil
}
