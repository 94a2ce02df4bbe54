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

	"github.com/ProtonMail/go-crypto/openpgp"
)

// requireTool returns the path of an outside program, or skips the test
// when it is missing (fails instead when HL7MAIL_REQUIRE_REAL or CI is set;
// "make test" installs it).
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("HL7MAIL_REQUIRE_REAL") != "" || os.Getenv("CI") != "" {
			t.Fatalf("%s is missing: run integration/deps.sh (make test does)", name)
		}
		t.Skipf("%s is missing: run integration/deps.sh or make test", name)
	}
	return p
}

// gnupg is a throw-away GnuPG home holding the hospital's and the lab's
// private keys.
type gnupg struct {
	t    *testing.T
	bin  string
	home string
}

func newGnuPG(t *testing.T) *gnupg {
	t.Helper()
	pgpKeys(t)
	home, err := os.MkdirTemp("", "gpg") // short: the agent socket path is limited
	if err != nil {
		t.Fatal(err)
	}
	g := &gnupg{t: t, bin: requireTool(t, "gpg"), home: home}
	t.Cleanup(func() {
		exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
		os.RemoveAll(home)
	})
	for _, e := range []*openpgp.Entity{hospital, lab} {
		priv, err := ArmorPGPPrivate(e, nil)
		if err != nil {
			t.Fatal(err)
		}
		g.run(priv, "--import")
	}
	return g
}

// run runs gpg with stdin and returns its standard output.
func (g *gnupg) run(stdin []byte, args ...string) []byte {
	g.t.Helper()
	out, stderr, err := g.try(stdin, args...)
	if err != nil {
		g.t.Fatalf("gpg %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return out
}

func (g *gnupg) try(stdin []byte, args ...string) ([]byte, []byte, error) {
	cmd := exec.Command(g.bin, append([]string{"--homedir", g.home, "--batch", "--yes", "--no-tty",
		"--pinentry-mode", "loopback", "--passphrase", "", "--trust-model", "always"}, args...)...)
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.Bytes(), errb.Bytes(), err
}

func (g *gnupg) file(name string, data []byte) string {
	p := filepath.Join(g.home, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		g.t.Fatal(err)
	}
	return p
}

// parts splits an entity's multipart body (test helper).
func parts(t *testing.T, entity []byte) [][]byte {
	t.Helper()
	e, err := parseEntity(entity)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := e.parts()
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func body(t *testing.T, entity []byte) []byte {
	t.Helper()
	_, b, err := splitEntity(entity)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGnuPGReadsOurs: GnuPG decrypts what hl7mail sends, verifies the
// signature as good and by the hospital's key, and the base64 body decodes
// to the original HL7 bytes. The MIC equals openssl's digest of the signed
// part.
func TestGnuPGReadsOurs(t *testing.T) {
	g := newGnuPG(t)
	payload := loadCorpus(t)[6] // several OBX segments, bare CRs
	sealed, mic := seal(t, payload, hospital)
	enc := parts(t, sealed)
	if len(enc) != 2 || !bytes.Contains(enc[0], []byte("Version: 1")) {
		t.Fatalf("multipart/encrypted parts: %q", enc)
	}
	ciphertext := g.file("msg.asc", body(t, enc[1]))
	signedEntity := g.run(nil, "--decrypt", ciphertext)

	signed := parts(t, signedEntity)
	if len(signed) != 2 {
		t.Fatalf("multipart/signed has %d parts", len(signed))
	}
	data := g.file("signed.eml", signed[0])
	sig := g.file("signature.asc", body(t, signed[1]))
	status := string(g.run(nil, "--status-fd", "1", "--verify", sig, data))
	if !strings.Contains(status, "[GNUPG:] GOODSIG") || !strings.Contains(status, "[GNUPG:] VALIDSIG "+Fingerprint(hospital)) {
		t.Errorf("gpg --verify status:\n%s", status)
	}

	b64 := body(t, signed[0])
	decoded, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(b64), "\r\n", ""))
	if err != nil || !bytes.Equal(decoded, payload) {
		t.Errorf("base64 body decodes to %q, %v; want the original HL7", decoded, err)
	}

	openssl := requireTool(t, "openssl")
	out, err := exec.Command(openssl, "dgst", "-sha256", "-binary", data).Output()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, mic.Digest) {
		t.Errorf("openssl dgst of the signed part = %x, MIC %x", out, mic.Digest)
	}
}

// TestWeReadGnuPG: hl7mail opens what GnuPG writes, in two layers
// (detached signature inside multipart/signed, then encrypted) and combined
// (one signed and encrypted OpenPGP message).
func TestWeReadGnuPG(t *testing.T) {
	g := newGnuPG(t)
	payload := loadCorpus(t)[42]
	edi, err := EncodeEDI(payload, EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ediFile := g.file("edi.eml", edi)
	hospitalID, labID := Fingerprint(hospital), Fingerprint(lab)

	// Layered.
	sig := g.run(nil, "--armor", "--detach-sign", "--digest-algo", "SHA256", "--local-user", hospitalID, "--output", "-", ediFile)
	signed := assembleSigned(edi, sig, "pgp-sha256")
	enc := g.run(nil, "--armor", "--encrypt", "--recipient", labID, "--output", "-", g.file("signed.eml", signed))
	o, err := PGPOpen(mail(assembleEncrypted(enc)), labKeys(), hospital, time.Now())
	if err != nil {
		t.Fatalf("PGPOpen(gpg layered): %v", err)
	}
	checkOpened(t, "layered", o, payload, false)

	// Combined.
	comb := g.run(nil, "--armor", "--sign", "--encrypt", "--digest-algo", "SHA256", "--local-user", hospitalID,
		"--recipient", labID, "--output", "-", ediFile)
	o, err = PGPOpen(mail(assembleEncrypted(comb)), labKeys(), hospital, time.Now())
	if err != nil {
		t.Fatalf("PGPOpen(gpg combined): %v", err)
	}
	checkOpened(t, "combined", o, payload, true)
}

func checkOpened(t *testing.T, what string, o *Opened, payload []byte, combined bool) {
	t.Helper()
	got, _, err := DecodeEDI(o.Entity, Accept{})
	if err != nil || !bytes.Equal(got, payload) {
		t.Errorf("%s: payload %q, %v", what, got, err)
	}
	if o.Signer != Fingerprint(hospital) || o.Combined != combined || !o.Encrypted {
		t.Errorf("%s: Opened = signer %s combined %v encrypted %v", what, o.Signer, o.Combined, o.Encrypted)
	}
	if !o.MIC.Equal(ComputeMIC(o.Entity)) {
		t.Errorf("%s: MIC %s", what, o.MIC)
	}
}

// TestGnuPGSHA1Refused: a legacy partner whose GnuPG signs with SHA-1 is
// refused with ErrWeakAlgorithm, as is a GnuPG RSA key under 2048 bits.
func TestGnuPGSHA1Refused(t *testing.T) {
	g := newGnuPG(t)
	g.run(nil, "--quick-generate-key", "Legacy Lab <old@partner.test>", "rsa2048", "sign", "never")
	legacy, err := ReadPGPKey(bytes.NewReader(g.run(nil, "--armor", "--export", "old@partner.test")), nil)
	if err != nil {
		t.Fatal(err)
	}
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A||||||ORU^R01|1|P|2.3\r"), EDIOptions{})
	sig := g.run(nil, "--armor", "--detach-sign", "--digest-algo", "SHA1", "--local-user", "old@partner.test",
		"--output", "-", g.file("edi.eml", edi))
	enc, err := PGPEncrypt(assembleSigned(edi, sig, "pgp-sha1"), []*openpgp.Entity{lab}, now)
	if err != nil {
		t.Fatal(err)
	}
	_, err = PGPOpen(mail(enc), PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{legacy}}, legacy, time.Now())
	if !errors.Is(err, ErrWeakAlgorithm) {
		t.Errorf("PGPOpen(SHA-1 signature by gpg) = %v, want ErrWeakAlgorithm", err)
	}
}

// TestGnuPGImportsKeygen: the keys GeneratePGPKey writes (Ed25519/Cv25519
// and RSA-3072, passphrase-protected or not) are read by GnuPG.
func TestGnuPGImportsKeygen(t *testing.T) {
	g := newGnuPG(t)
	for _, rsa := range []bool{false, true} {
		e, err := GeneratePGPKey(PGPKeyOptions{Name: "New Partner", Email: "new@partner.test", RSA: rsa})
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := ArmorPGPPublic(e)
		priv, err := ArmorPGPPrivate(e, []byte("correct horse"))
		if err != nil {
			t.Fatal(err)
		}
		out := string(g.run(pub, "--status-fd", "1", "--import"))
		if !strings.Contains(out, "IMPORT_OK") || !strings.Contains(out, Fingerprint(e)) {
			t.Errorf("rsa=%v: gpg --import public:\n%s", rsa, out)
		}
		back, err := ReadPGPKey(bytes.NewReader(priv), []byte("correct horse"))
		if err != nil || Fingerprint(back) != Fingerprint(e) {
			t.Errorf("rsa=%v: ReadPGPKey(protected) = %v", rsa, err)
		}
		if _, err := ReadPGPKey(bytes.NewReader(priv), nil); err == nil {
			t.Errorf("rsa=%v: protected key read without passphrase", rsa)
		}
		// The entity stays usable after writing the protected copy.
		if _, _, err := PGPSign([]byte("x"), e, time.Now()); err != nil {
			t.Errorf("rsa=%v: sign after ArmorPGPPrivate: %v", rsa, err)
		}
	}
}
