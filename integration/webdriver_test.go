package integration

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// browser is headless Chromium driven over the W3C WebDriver protocol by
// Debian's ChromeDriver: plain HTTP and JSON, no client library needed.
type browser struct {
	t       *testing.T
	base    string // http://127.0.0.1:PORT/session/ID
	driver  *exec.Cmd
	session string
	profile string // Chromium's user-data-dir, removed by close
}

// startBrowser starts ChromeDriver and a headless Chromium session with the
// flags this machine's closed network needs.
func startBrowser(t *testing.T) *browser {
	t.Helper()
	requireTool(t, "/usr/bin/chromium")
	driverPath := requireTool(t, "/usr/bin/chromedriver")
	addr := freePort(t)
	port := addr[strings.LastIndex(addr, ":")+1:]
	// The profile folder is removed by close, after the browser has quit:
	// a t.TempDir cleanup would run before close and race Chromium's last
	// writes into it.
	profile, err := os.MkdirTemp("", "hl7mail-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	log := &lockedBuffer{}
	cmd := exec.Command(driverPath, "--port="+port, "--allowed-ips=127.0.0.1")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		os.RemoveAll(profile)
		t.Fatal(err)
	}
	b := &browser{t: t, driver: cmd, base: "http://" + addr, profile: profile}
	t.Cleanup(b.close)
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(b.base + "/status")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromedriver did not start: %v\n%s", err, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	caps := map[string]any{"capabilities": map[string]any{"alwaysMatch": map[string]any{
		"browserName": "chrome",
		"goog:chromeOptions": map[string]any{
			"binary": "/usr/bin/chromium",
			"args": []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
				"--disable-background-networking", "--disable-component-update", "--disable-sync",
				"--disable-dev-shm-usage", "--user-data-dir=" + profile, "--window-size=1500,1300"},
		},
	}}}
	var out struct {
		SessionID string `json:"sessionId"`
	}
	b.do("POST", "/session", caps, &out)
	if out.SessionID == "" {
		t.Fatalf("no WebDriver session\n%s", log)
	}
	b.session = out.SessionID
	return b
}

// do sends a WebDriver command and decodes its "value" into out.
func (b *browser) do(method, path string, body, out any) {
	b.t.Helper()
	var rd io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, b.base+path, rd)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.t.Fatalf("webdriver %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	var env struct {
		Value json.RawMessage `json:"value"`
	}
	data, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(data, &env); err != nil || resp.StatusCode != 200 {
		b.t.Fatalf("webdriver %s %s: %s %s", method, path, resp.Status, data)
	}
	if out != nil {
		if err := json.Unmarshal(env.Value, out); err != nil {
			b.t.Fatalf("webdriver %s %s: %v", method, path, err)
		}
	}
}

func (b *browser) sessionPath(p string) string { return "/session/" + b.session + p }

// open navigates to url.
func (b *browser) open(url string) {
	b.do("POST", b.sessionPath("/url"), map[string]string{"url": url}, nil)
}

// eval runs script (a function body that returns a value) in the page.
func (b *browser) eval(script string, out any) {
	b.do("POST", b.sessionPath("/execute/sync"), map[string]any{"script": script, "args": []any{}}, out)
}

// screenshot saves the page as a PNG at path.
func (b *browser) screenshot(path string) {
	var data string
	b.do("GET", b.sessionPath("/screenshot"), nil, &data)
	png, err := base64.StdEncoding.DecodeString(data)
	if err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

func (b *browser) close() {
	if b.session != "" {
		req, _ := http.NewRequest("DELETE", b.base+b.sessionPath(""), nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
		b.session = ""
	}
	if b.driver != nil && b.driver.Process != nil {
		b.driver.Process.Kill()
		b.driver.Wait()
		b.driver = nil
	}
	if b.profile != "" {
		// Chromium's helpers may still be flushing for a moment after the
		// session ends.
		for i := 0; i < 50; i++ {
			if os.RemoveAll(b.profile) == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		b.profile = ""
	}
}

// artifactDir returns the folder test artifacts are kept in:
// $HL7MAIL_ARTIFACTS, or var/artifacts at the repository's top.
func artifactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("HL7MAIL_ARTIFACTS")
	if dir == "" {
		dir = "../var/artifacts"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// waitFor evaluates script until it returns true, for at most d; it
// returns how long that took.
func (b *browser) waitFor(what, script string, d time.Duration) time.Duration {
	b.t.Helper()
	start := time.Now()
	for {
		var ok bool
		b.eval(script, &ok)
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > d {
			b.t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
