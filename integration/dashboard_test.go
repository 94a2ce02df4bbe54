package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/mllp"
)

// sendOne sends msg to a surrogate and returns the ACK code.
func sendOne(t *testing.T, addr string, msg []byte) hl7.AckCode {
	t.Helper()
	c, err := mllp.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := c.Send(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	a, err := hl7.ParseAck(reply)
	if err != nil {
		t.Fatalf("ACK %q: %v", reply, err)
	}
	return a.Code
}

// waitReady waits for the dashboard's /readyz.
func (in *instance) waitReady(token string) {
	in.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		req, _ := http.NewRequest("GET", "http://"+in.dash+"/readyz", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			in.t.Fatalf("dashboard %s not ready: %v\n%s", in.dash, err, in.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDashboardBrowser drives headless Chromium against a running "hl7mail
// serve": the page shows the configured partners; a message sent to a
// surrogate appears in the message table, and its log line in the live
// tail, within 2 seconds; a screenshot is kept in var/artifacts.
func TestDashboardBrowser(t *testing.T) {
	b := startBrowser(t)
	in := newInstance(t, "tucker-lab", "clinic")
	in.start()
	in.waitReady("")
	b.open("http://" + in.dash + "/")
	b.waitFor("partner table", `return [...document.querySelectorAll('#partners tbody tr')].map(r => r.dataset.partner).join(',') === 'tucker-lab,clinic'`, 10*time.Second)
	b.waitFor("live log connected", `return document.getElementById('log-state').textContent === 'live'`, 10*time.Second)

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	msg := msgs[7]
	h, err := hl7.ParseHeader(msg)
	if err != nil {
		t.Fatal(err)
	}
	if code := sendOne(t, in.listen["tucker-lab"], msg); code != hl7.CommitAccept {
		t.Fatalf("surrogate answered %s", code)
	}
	id, _ := json.Marshal(h.ControlID)
	took := b.waitFor("message in the table and its log line in the tail", fmt.Sprintf(`
		const id = %s;
		const row = [...document.querySelectorAll('#messages tbody tr')].some(r => r.dataset.controlId === id);
		const line = [...document.querySelectorAll('#log li')].some(li => li.textContent.includes('control_id=' + id));
		return row && line;`, id), 2*time.Second)
	t.Logf("message %s shown in the table and the live tail %s after its CA", h.ControlID, took.Round(time.Millisecond))
	// More corpus traffic for the lab: the charts of the last 24 hours
	// count it, and its queue, for that partner only.
	for _, m := range msgs[20:24] {
		if code := sendOne(t, in.listen["tucker-lab"], m); code != hl7.CommitAccept {
			t.Fatalf("surrogate answered %s", code)
		}
	}
	b.waitFor("the traffic in the partner's charts", `
		const sum = (p, c) => Number(document.querySelector('#charts .chart-row[data-partner="' + p + '"] svg[data-chart="' + c + '"]')?.dataset.sum || 0);
		return sum('tucker-lab', 'messages') === 5 && sum('tucker-lab', 'queued') > 0 &&
			sum('clinic', 'messages') === 0 && sum('clinic', 'queued') === 0;`, 25*time.Second)

	// A plain receipt from the partner (security: none) that names no
	// message of ours: recorded, and listed under receipts and bounces.
	receipt := "From: tucker-lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: <r1@partner.test>\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary=\"R\"\r\n\r\n" +
		"--R\r\nContent-Type: text/plain\r\n\r\nProcessed.\r\n--R\r\nContent-Type: message/disposition-notification\r\n\r\n" +
		"Reporting-UA: partner.test; theirs\r\nFinal-Recipient: rfc822; tucker-lab@partner.test\r\n" +
		"Original-Message-ID: <never-sent@hospital.test>\r\nDisposition: automatic-action/MDN-sent-automatically; processed\r\n\r\n--R--\r\n"
	recv := exec.Command(binary, "receive", "-config", in.config)
	recv.Stdin = strings.NewReader(receipt)
	if out, err := recv.CombinedOutput(); err != nil {
		t.Fatalf("hl7mail receive of a receipt: %v\n%s", err, out)
	}
	b.waitFor("the receipt in the list of receipts and bounces", `
		return [...document.querySelectorAll('#reports li')].some(li => li.textContent.includes('MDN processed → unknown'));`,
		10*time.Second)

	var text string
	b.eval(`return document.body.innerText`, &text)
	if !strings.Contains(text, "tucker-lab") || !strings.Contains(text, h.ControlID) {
		t.Errorf("page text lacks the partner or the control ID")
	}
	for _, phi := range corpus.PatientData(append([][]byte{msg}, msgs[20:24]...)) {
		if strings.Contains(text, phi) {
			t.Errorf("the page shows patient data %q", phi)
		}
	}
	shot := filepath.Join(artifactDir(t), "dashboard.png")
	b.screenshot(shot)
	if fi, err := os.Stat(shot); err != nil || fi.Size() < 10_000 {
		t.Errorf("screenshot %s: %v", shot, err)
	}
	t.Logf("screenshot: %s", shot)
}

// TestDashboardToken: a dashboard on a non-loopback address without a
// token refuses to start; with one, requests without it get 401, and the
// operator commands use the token file.
func TestDashboardToken(t *testing.T) {
	in := newInstance(t, "tucker-lab")
	port := in.dash[strings.LastIndex(in.dash, ":")+1:]
	in.edit("dashboard: {addr: "+in.dash+"}", "dashboard: {addr: 0.0.0.0:"+port+"}")
	out, code := in.run("serve", "-config", in.config)
	if code == 0 || !strings.Contains(out, "dashboard.token_file") {
		t.Fatalf("serve without a token on 0.0.0.0 exited %d:\n%s", code, out)
	}
	// Too short first: refused; then one of 32 bytes and more.
	os.WriteFile(filepath.Join(in.dir, "token"), []byte("short-token\n"), 0o600)
	in.edit("dashboard: {addr: 0.0.0.0:"+port+"}", "dashboard: {addr: 0.0.0.0:"+port+", token_file: token}")
	if out, code := in.run("serve", "-config", in.config); code == 0 || !strings.Contains(out, "the token holds 11 bytes; at least 32") {
		t.Fatalf("serve with a short token exited %d:\n%s", code, out)
	}
	in.edit("dashboard: {addr: 0.0.0.0:"+port+", token_file: token}", "dashboard: {addr: 0.0.0.0:"+port+"}")
	token := "a-long-random-dashboard-token-of-40-bytes"
	os.WriteFile(filepath.Join(in.dir, "token"), []byte(token+"\n"), 0o600)
	in.edit("dashboard: {addr: 0.0.0.0:"+port+"}", "dashboard: {addr: 0.0.0.0:"+port+", token_file: token}")
	in.dash = "127.0.0.1:" + port
	in.start()
	in.waitReady(token)
	for _, path := range []string{"/", "/api/overview", "/api/log", "/metrics", "/healthz"} {
		resp, err := http.Get("http://" + in.dash + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without the token = %d, want 401", path, resp.StatusCode)
		}
	}
	req, _ := http.NewRequest("GET", "http://"+in.dash+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "hl7mail_queue_depth") {
		t.Errorf("GET /metrics with the token = %d", resp.StatusCode)
	}
	if out, code := in.run("status", "-config", in.config); code != 0 || !strings.Contains(out, "running") || !strings.Contains(out, "tucker-lab") {
		t.Errorf("status with the token file: %d\n%s", code, out)
	}
}

// refusingSMTP starts an embedded SMTP server that refuses every mail
// (550) and a running instance with one partner, tucker-lab, that submits
// to it.
func refusingSMTP(t *testing.T) (*embedded.SMTP, *instance) {
	t.Helper()
	srv, addr := startSMTP(t)
	srv.FailPermanently()
	in := newInstance(t, "tucker-lab")
	in.useSMTP(addr)
	in.start()
	in.waitReady("")
	return srv, in
}

// TestOperatorCommands: status, alerts, retry against a running instance
// (through its dashboard) and a stopped one (through its store).
func TestOperatorCommands(t *testing.T) {
	smtpSrv, in := refusingSMTP(t)
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	if code := sendOne(t, in.listen["tucker-lab"], msgs[3]); code != hl7.CommitAccept {
		t.Fatalf("surrogate answered %s", code)
	}
	list := in.waitMessages(1, func(l []storedMessage) bool { return l[0].State == "failed" })

	type alert struct {
		ID      int64  `json:"id"`
		Kind    string `json:"kind"`
		Partner string `json:"partner"`
		AckedBy string `json:"acked_by"`
	}
	alerts := func(args ...string) []alert {
		t.Helper()
		out, code := in.run(append([]string{"alerts", "-config", in.config, "-json"}, args...)...)
		var a []alert
		if code != 0 || json.Unmarshal([]byte(out), &a) != nil {
			t.Fatalf("alerts: %d\n%s", code, out)
		}
		return a
	}
	open := alerts()
	if len(open) != 1 || open[0].Kind != "failed" || open[0].Partner != "tucker-lab" {
		t.Fatalf("alerts = %+v, want one failed", open)
	}
	type overview struct {
		Partners []struct {
			Name        string `json:"name"`
			Connections int    `json:"connections"`
			Failed      int    `json:"failed"`
			OutToday    int    `json:"out_today"`
		} `json:"partners"`
		SMTP struct {
			State string `json:"state"`
		} `json:"smtp"`
		OpenAlerts int `json:"open_alerts"`
	}
	status := func() overview {
		t.Helper()
		out, code := in.run("status", "-config", in.config, "-json")
		var o overview
		if code != 0 || json.Unmarshal([]byte(out), &o) != nil {
			t.Fatalf("status: %d\n%s", code, out)
		}
		return o
	}
	if o := status(); len(o.Partners) != 1 || o.Partners[0].Failed != 1 || o.Partners[0].OutToday != 1 ||
		o.Partners[0].Connections != 0 || o.SMTP.State != "up" || o.OpenAlerts != 1 {
		t.Errorf("status while running = %+v", o)
	}
	if out, _ := in.run("status", "-config", in.config); !strings.Contains(out, "running, dashboard http://"+in.dash) {
		t.Errorf("status text:\n%s", out)
	}

	// The SMTP server takes mail again: the operator retries the message.
	smtpSrv.Recover()
	id := fmt.Sprint(list[0].ID)
	if out, code := in.run("retry", "-config", in.config, id); code != 0 {
		t.Fatalf("retry: %d\n%s", code, out)
	}
	in.waitMessages(1, func(l []storedMessage) bool { return l[0].State == "sent" })
	if smtpSrv.Count() != 1 {
		t.Errorf("SMTP server took %d mails, want 1", smtpSrv.Count())
	}
	if out, code := in.run("retry", "-config", in.config, id); code == 0 || !strings.Contains(out, "only failed, expired or bounced") {
		t.Errorf("retry of a sent message: %d\n%s", code, out)
	}
	// Two more fail; "retry -all" puts both back, and they leave in order.
	smtpSrv.FailPermanently()
	for _, m := range msgs[4:6] {
		if code := sendOne(t, in.listen["tucker-lab"], m); code != hl7.CommitAccept {
			t.Fatalf("surrogate answered %s", code)
		}
	}
	in.waitMessages(3, func(l []storedMessage) bool { return l[0].State == "failed" && l[1].State == "failed" })
	smtpSrv.Recover()
	if out, code := in.run("retry", "-config", in.config, "-all"); code != 0 || !strings.Contains(out, "2 messages queued again") {
		t.Fatalf("retry -all: %d\n%s", code, out)
	}
	in.waitMessages(3, func(l []storedMessage) bool {
		return l[0].State == "sent" && l[1].State == "sent" && l[2].State == "sent"
	})
	if mails := smtpSrv.Mails(); len(mails) != 3 || messageID(mails[1].Data) == messageID(mails[2].Data) ||
		!strings.Contains(string(mails[1].Data), "Subject: HL7 ") {
		t.Errorf("SMTP server took %d mails, want 3", len(mails))
	}
	open = alerts()
	for _, a := range open {
		if out, code := in.run("alerts", "-config", in.config, "-ack", fmt.Sprint(a.ID), "-by", "night shift"); code != 0 {
			t.Fatalf("alerts -ack: %d\n%s", code, out)
		}
	}
	if a := alerts(); len(a) != 0 {
		t.Errorf("open alerts after ack = %+v", a)
	}

	// Stopped: the same commands read the store.
	in.stop()
	if out, _ := in.run("status", "-config", in.config); !strings.Contains(out, "not running") || !strings.Contains(out, "tucker-lab") {
		t.Errorf("status while stopped:\n%s", out)
	}
	if a := alerts("-all"); len(a) != 3 || a[0].AckedBy != "night shift" {
		t.Errorf("alerts -all while stopped = %+v", a)
	}
	if out, code := in.run("retry", "-config", in.config, "999"); code == 0 || !strings.Contains(out, "no such message") {
		t.Errorf("retry of an unknown message while stopped: %d\n%s", code, out)
	}
}

// TestDashboardRetryButton: in headless Chromium, a partner with a failed
// message shows a Retry button in its row; once the SMTP server takes mail
// again, a click sends the message.
func TestDashboardRetryButton(t *testing.T) {
	b := startBrowser(t)
	smtpSrv, in := refusingSMTP(t)
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	if code := sendOne(t, in.listen["tucker-lab"], msgs[9]); code != hl7.CommitAccept {
		t.Fatalf("surrogate answered %s", code)
	}
	in.waitMessages(1, func(l []storedMessage) bool { return l[0].State == "failed" })
	// A change needs the token: "hl7mail dashboard" prints the page's
	// address with it.
	link, code := in.run("dashboard", "-config", in.config)
	if code != 0 || !strings.Contains(link, "?token=") {
		t.Fatalf("hl7mail dashboard: %d %s", code, link)
	}
	b.open(strings.TrimSpace(link))
	button := `document.querySelector('#partners tbody tr[data-partner="tucker-lab"] button.retry-partner')`
	b.waitFor("the Retry button", "return "+button+" !== null", 10*time.Second)
	smtpSrv.Recover()
	var clicked bool
	b.eval("const b = "+button+"; b.click(); return true", &clicked)
	in.waitMessages(1, func(l []storedMessage) bool { return l[0].State == "sent" })
	if smtpSrv.Count() != 1 {
		t.Errorf("SMTP server took %d mails, want 1", smtpSrv.Count())
	}
	b.waitFor("the button gone", "return "+button+" === null", 10*time.Second)
}
