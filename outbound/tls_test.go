package outbound

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/mailtest"
)

// TestSubmitStartTLSAuth submits over STARTTLS with AUTH PLAIN, as to a real
// submission server; a wrong password and an untrusted certificate fail
// (and are not final: the message would be retried).
func TestSubmitStartTLSAuth(t *testing.T) {
	cert, pool := mailtest.ServerCert(t)
	srv := &embedded.SMTP{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}},
		Users: map[string]string{"edi@hospital.test": "s3cret"}}
	addr, err := srv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	mail := []byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nSubject: x\r\n\r\n.a line with a dot\r\nbody\r\n")
	good := &SMTPSubmitter{Addr: addr, TLS: "starttls", TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"},
		Username: "edi@hospital.test", Password: "s3cret"}
	if err := good.Submit(ctx, "edi@hospital.test", []string{"lab@partner.test"}, mail, SubmitOptions{}); err != nil {
		t.Fatalf("Submit over STARTTLS with AUTH: %v", err)
	}
	if got := srv.Mails(); len(got) != 1 || string(got[0].Data) != string(mail) {
		t.Fatalf("server got %+v", got)
	}
	wrong := *good
	wrong.Password = "guess"
	err = wrong.Submit(ctx, "edi@hospital.test", []string{"lab@partner.test"}, mail, SubmitOptions{})
	if err == nil || !strings.Contains(err.Error(), "auth") || Classify(err) != FaultLink {
		t.Errorf("Submit with a wrong password = %v, want an AUTH error about the link (FaultLink)", err)
	}
	untrusted := &SMTPSubmitter{Addr: addr, TLS: "starttls", Username: "edi@hospital.test", Password: "s3cret"}
	err = untrusted.Submit(ctx, "edi@hospital.test", []string{"lab@partner.test"}, mail, SubmitOptions{})
	// The handshake completes with the first command after STARTTLS.
	if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") || Classify(err) != FaultLink {
		t.Errorf("Submit to an untrusted certificate = %v, want a certificate error that is retried", err)
	}
	if n := srv.Count(); n != 1 {
		t.Errorf("server took %d mails, want 1", n)
	}
}

// TestRequireTLS: for a partner with require_tls, mail goes only to a
// server reached over verified TLS that takes REQUIRETLS; anything less is
// a final refusal, not a downgrade.
func TestRequireTLS(t *testing.T) {
	cert, pool := mailtest.ServerCert(t)
	ctx := context.Background()
	mail := []byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nSubject: x\r\n\r\nbody\r\n")
	req := SubmitOptions{RequireTLS: true}
	for _, tt := range []struct {
		name       string
		requireTLS bool // the server offers REQUIRETLS
		tls        string
		ok         bool
	}{
		{"REQUIRETLS offered", true, "starttls", true},
		{"REQUIRETLS not offered", false, "starttls", false},
		{"no TLS to the server", true, "none", false},
	} {
		srv := &embedded.SMTP{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, RequireTLS: tt.requireTLS}
		addr, err := srv.Serve("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		sub := &SMTPSubmitter{Addr: addr, TLS: config.TLSMode(tt.tls), TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}}
		err = sub.Submit(ctx, "edi@hospital.test", []string{"lab@partner.test"}, mail, req)
		got := srv.Mails()
		srv.Close()
		if tt.ok {
			if err != nil || len(got) != 1 || !got[0].RequireTLS {
				t.Errorf("%s: Submit = %v, server got %+v; want the mail with REQUIRETLS", tt.name, err, got)
			}
			continue
		}
		if !errors.Is(err, ErrTLSRequired) || Classify(err) != FaultPartner || len(got) != 0 {
			t.Errorf("%s: Submit = %v (fault %v), server got %d mails; want ErrTLSRequired, the partner held, nothing sent",
				tt.name, err, Classify(err), len(got))
		}
	}
}

// TestProbe: Probe reports what the server offers after STARTTLS, sending
// nothing.
func TestProbe(t *testing.T) {
	cert, pool := mailtest.ServerCert(t)
	for _, tt := range []struct {
		users      map[string]string
		requireTLS bool
		want       Offer
	}{
		{want: Offer{TLS: true}},
		{users: map[string]string{"a": "b"}, requireTLS: true, want: Offer{TLS: true, Auth: true, RequireTLS: true}},
	} {
		srv := &embedded.SMTP{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, Users: tt.users, RequireTLS: tt.requireTLS}
		addr, err := srv.Serve("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		sub := &SMTPSubmitter{Addr: addr, TLS: "starttls", TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}}
		got, err := sub.Probe(context.Background(), 5*time.Second)
		srv.Close()
		if err != nil || got != tt.want || srv.Count() != 0 {
			t.Errorf("Probe = %+v, %v (%d mails); want %+v and nothing sent", got, err, srv.Count(), tt.want)
		}
	}
}
