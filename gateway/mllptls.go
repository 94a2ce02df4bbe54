package gateway

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/hl7mail/hl7mail/config"
)

// MLLP over TLS, for routers on another host: a surrogate's listener
// (partners[].listen_tls) and delivery to the router (router.tls). TLS 1.2
// or later, certificates always verified.

// listenTLSConfig builds the server side of a surrogate from t: our
// certificate, and a client certificate required when a client CA is set.
func listenTLSConfig(cfg *config.Config, t *config.ListenTLS) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(cfg.Path(t.CertFile), cfg.Path(t.KeyFile))
	if err != nil {
		return nil, fmt.Errorf("listen_tls: %w", err)
	}
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.ClientCAFile != "" {
		pool, err := loadPool(cfg.Path(t.ClientCAFile))
		if err != nil {
			return nil, fmt.Errorf("listen_tls.client_ca_file: %w", err)
		}
		c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return c, nil
}

// routerTLSConfig builds the client side of delivery to the router, or nil
// without router.tls. The server name is set per router address.
func routerTLSConfig(cfg *config.Config) (*tls.Config, error) {
	t := cfg.Router.TLS
	if t == nil {
		return nil, nil
	}
	pool, err := loadPool(cfg.Path(t.CAFile))
	if err != nil {
		return nil, fmt.Errorf("router.tls.ca_file: %w", err)
	}
	c := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.Path(t.CertFile), cfg.Path(t.KeyFile))
		if err != nil {
			return nil, fmt.Errorf("router.tls: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

func loadPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return pool, nil
}

// tlsHolder serves a listener's TLS settings, so that a reload gives a
// renewed certificate to new connections without closing the listener.
type tlsHolder struct{ p atomic.Pointer[tls.Config] }

func (h *tlsHolder) config() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return h.p.Load(), nil }}
}
