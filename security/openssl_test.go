package security

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// opensslDir writes the hospital's and the lab's certificates and keys as
// PEM files and returns the folder and the openssl binary.
func opensslDir(t *testing.T) (string, string) {
	t.Helper()
	smimeCerts(t)
	bin := requireTool(t, "openssl")
	dir := t.TempDir()
	for name, p := range map[string]smimeParty{"hospital": sHospital, "lab": sLab} {
		key, err := PEMKey(p.key)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, name+".crt"), PEMCert(p.cert), 0o600)
		os.WriteFile(filepath.Join(dir, name+".key"), key, 0o600)
	}
	return dir, bin
}

func openssl(t *testing.T, bin, dir string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return append(out.Bytes(), stderr.Bytes()...)
}

// TestOpenSSLReadsOurs: "openssl cms -decrypt" then "openssl cms -verify"
// accept what hl7mail writes, with both key transports, and the MIC equals
// openssl's digest of the signed part.
func TestOpenSSLReadsOurs(t *testing.T) {
	dir, bin := opensslDir(t)
	payload := loadCorpus(t)[9]
	for _, kt := range []KeyTransport{OAEPSHA256, PKCS1v15} {
		sealed, mic := smimeSeal(t, payload, sHospital, kt)
		os.WriteFile(filepath.Join(dir, "mail.eml"), sealed, 0o600)
		openssl(t, bin, dir, "cms", "-decrypt", "-in", "mail.eml", "-recip", "lab.crt", "-inkey", "lab.key", "-out", "signed.eml")
		// Verified in OpenSSL's default (text) mode, as a partner would: its
		// S/MIME reader normalizes line ends, and text mode restores CRLF.
		out := openssl(t, bin, dir, "cms", "-verify", "-in", "signed.eml", "-CAfile", "hospital.crt", "-purpose", "smimesign",
			"-out", "content.eml")
		if !strings.Contains(string(out), "Verification successful") {
			t.Errorf("kt %d: openssl cms -verify: %s", kt, out)
		}
		content, _ := os.ReadFile(filepath.Join(dir, "content.eml"))
		_, b64, err := splitEntity(Canonical(content))
		if err != nil {
			t.Fatal(err)
		}
		decoded, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(b64), "\r\n", ""))
		if err != nil || !bytes.Equal(decoded, payload) {
			t.Errorf("kt %d: content decodes to %q, %v", kt, decoded, err)
		}
		signed, _ := os.ReadFile(filepath.Join(dir, "signed.eml"))
		ps := parts(t, signed)
		os.WriteFile(filepath.Join(dir, "part.eml"), ps[0], 0o600)
		if d := openssl(t, bin, dir, "dgst", "-sha256", "-binary", "part.eml"); !bytes.Equal(d, mic.Digest) {
			t.Errorf("kt %d: openssl dgst %x, MIC %x", kt, d, mic.Digest)
		}
	}
}

// TestWeReadOpenSSL: hl7mail opens what OpenSSL writes: a detached SHA-256
// signature, encrypted with AES-256-CBC and RSA-OAEP-SHA256, with
// AES-128-CBC and PKCS #1 v1.5, and with AES-256-GCM (authEnveloped-data).
func TestWeReadOpenSSL(t *testing.T) {
	dir, bin := opensslDir(t)
	payload := loadCorpus(t)[11]
	edi, _ := EncodeEDI(payload, EDIOptions{})
	os.WriteFile(filepath.Join(dir, "edi.eml"), edi, 0o600)
	openssl(t, bin, dir, "cms", "-sign", "-in", "edi.eml", "-signer", "hospital.crt", "-inkey", "hospital.key",
		"-md", "sha256", "-binary", "-out", "signed.eml")
	for _, enc := range [][]string{
		{"-aes-256-cbc", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"},
		{"-aes-128-cbc"},
		{"-aes-256-gcm"},
	} {
		args := append([]string{"cms", "-encrypt", "-binary", "-in", "signed.eml", "-out", "enc.eml", "-recip", "lab.crt"}, enc...)
		openssl(t, bin, dir, args...)
		m, _ := os.ReadFile(filepath.Join(dir, "enc.eml"))
		o, err := SMIMEOpen(m, labSMIME(), sHospital.cert, time.Now())
		if err != nil {
			t.Errorf("%v: SMIMEOpen: %v", enc, err)
			continue
		}
		got, _, err := DecodeEDI(o.Entity, Accept{})
		if err != nil || !bytes.Equal(got, payload) || !o.MIC.Equal(ComputeMIC(edi)) {
			t.Errorf("%v: payload %q, %v, MIC %s", enc, got, err, o.MIC)
		}
	}
}

// TestOpenSSLSHA1Refused: a partner whose OpenSSL signs with SHA-1 is
// refused with ErrWeakAlgorithm.
func TestOpenSSLSHA1Refused(t *testing.T) {
	dir, bin := opensslDir(t)
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A||||||ORU^R01|1|P|2.3\r"), EDIOptions{})
	os.WriteFile(filepath.Join(dir, "edi.eml"), edi, 0o600)
	openssl(t, bin, dir, "cms", "-sign", "-in", "edi.eml", "-signer", "hospital.crt", "-inkey", "hospital.key",
		"-md", "sha1", "-binary", "-out", "signed.eml")
	openssl(t, bin, dir, "cms", "-encrypt", "-binary", "-aes-256-cbc", "-in", "signed.eml", "-out", "enc.eml", "-recip", "lab.crt")
	m, _ := os.ReadFile(filepath.Join(dir, "enc.eml"))
	if _, err := SMIMEOpen(m, labSMIME(), sHospital.cert, time.Now()); !errors.Is(err, ErrWeakAlgorithm) {
		t.Errorf("SMIMEOpen(SHA-1 signature) = %v, want ErrWeakAlgorithm", err)
	}
}

// TestLoadCertsP7B: trust bundles as CAs publish them, .p7b made by
// "openssl crl2pkcs7" in DER and in PEM, and a PEM chain, all read whole.
func TestLoadCertsP7B(t *testing.T) {
	dir, bin := opensslDir(t)
	chain := append(PEMCert(sHospital.cert), PEMCert(sLab.cert)...)
	os.WriteFile(filepath.Join(dir, "chain.pem"), chain, 0o600)
	openssl(t, bin, dir, "crl2pkcs7", "-nocrl", "-certfile", "chain.pem", "-outform", "DER", "-out", "bundle.p7b")
	openssl(t, bin, dir, "crl2pkcs7", "-nocrl", "-certfile", "chain.pem", "-out", "bundle.pem.p7b")
	for _, f := range []string{"chain.pem", "bundle.p7b", "bundle.pem.p7b", "lab.crt"} {
		certs, err := LoadCerts(filepath.Join(dir, f))
		want := 2
		if f == "lab.crt" {
			want = 1
		}
		if err != nil || len(certs) != want {
			t.Errorf("%s: %d certificates, %v; want %d", f, len(certs), err, want)
		}
	}
	os.WriteFile(filepath.Join(dir, "junk.p7b"), []byte("not a bundle"), 0o600)
	if _, err := LoadCerts(filepath.Join(dir, "junk.p7b")); err == nil {
		t.Error("junk read as certificates")
	}
}
