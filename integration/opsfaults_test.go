package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
)

// alertRow is one entry of "hl7mail alerts -json".
type alertRow struct {
	ID      int64  `json:"id"`
	Kind    string `json:"kind"`
	Partner string `json:"partner"`
	Text    string `json:"text"`
	Cleared string `json:"cleared"`
}

// alerts runs "hl7mail alerts -json" (-all with all).
func (in *instance) alerts(all bool) []alertRow {
	in.t.Helper()
	args := []string{"alerts", "-config", in.config, "-json"}
	if all {
		args = append(args, "-all")
	}
	out, code := in.run(args...)
	var list []alertRow
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil {
		in.t.Fatalf("hl7mail alerts: exit %d\n%s", code, out)
	}
	return list
}

// reload sends SIGHUP to the running instance.
func (in *instance) reload() {
	in.t.Helper()
	if err := in.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		in.t.Fatal(err)
	}
}

// maildir returns the mails delivered to account's inbox, in the order
// Dovecot delivered them (its file names start with seconds and
// microseconds).
func maildir(t *testing.T, servers, account string) []string {
	t.Helper()
	var files []string
	for _, sub := range []string{"new", "cur"} {
		names, _ := filepath.Glob(filepath.Join(servers, "mail", account, "Maildir", sub, "*"))
		files = append(files, names...)
	}
	when := func(name string) (int64, int64) {
		base := filepath.Base(name)
		secs, rest, _ := strings.Cut(base, ".M")
		micro, _, _ := strings.Cut(rest, "P")
		s, _ := strconv.ParseInt(secs, 10, 64)
		m, _ := strconv.ParseInt(micro, 10, 64)
		return s, m
	}
	sort.Slice(files, func(i, j int) bool {
		si, mi := when(files[i])
		sj, mj := when(files[j])
		return si < sj || si == sj && mi < mj
	})
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err == nil {
			out = append(out, string(b))
		}
	}
	return out
}

// subjectControlID returns the control ID in a mail's "HL7 <type> <id>"
// Subject.
func subjectControlID(mail string) string {
	for _, line := range strings.Split(mail, "\n") {
		line = strings.TrimRight(line, "\r")
		if line == "" {
			break
		}
		if v, ok := strings.CutPrefix(line, "Subject: HL7 "); ok {
			if _, id, ok := strings.Cut(v, " "); ok {
				return id
			}
		}
	}
	return ""
}

// hooks records the webhook's POSTs.
type hooks struct {
	mu     sync.Mutex
	bodies []string
}

func (h *hooks) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	h.mu.Lock()
	h.bodies = append(h.bodies, string(b))
	h.mu.Unlock()
}

func (h *hooks) all() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.bodies...)
}

// mllpSendAll sends batch to addr with Debian's mllp_send (python3-hl7), as
// a router would, and returns the control IDs in the order sent; every
// answer must be CA.
func mllpSendAll(t *testing.T, mllpSend, dir, addr string, batch [][]byte) []string {
	t.Helper()
	var framed []byte
	var ids []string
	for _, m := range batch {
		framed = mllp.AppendFrame(framed, m)
		h, _ := hl7.ParseHeader(m)
		ids = append(ids, h.ControlID)
	}
	file := filepath.Join(dir, "batch.mllp")
	os.WriteFile(file, framed, 0o600)
	host, p, _ := net.SplitHostPort(addr)
	out, err := exec.Command(mllpSend, "-p", p, "-f", file, host).Output()
	if err != nil {
		t.Fatalf("mllp_send: %v", err)
	}
	if n := strings.Count(string(out), "\rMSA|CA|"); n != len(batch) {
		t.Fatalf("mllp_send got %d CA answers, want %d", n, len(batch))
	}
	return ids
}

// TestSMTPSessionFaults runs the hospital's binary against real Postfix
// submission with SASL AUTH through Dovecot over STARTTLS, as sites run it.
//   - A wrong password: 50 messages all get CA, none fails, one alert is
//     open; the password file is mended and SIGHUP sent: all 50 reach the
//     lab's Maildir, submitted in order on few sessions (Postfix's log),
//     the alert clears, and the ops address gets the alert and a
//     "cleared" notice.
//   - The same with a server that offers no AUTH (Postfix's port without
//     SASL) while smtp.username is set.
//   - An overdue receipt: one notice mail (read from Dovecot) and one
//     webhook POST. No notice holds a patient's name or ID.
func TestSMTPSessionFaults(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	requireMailServers(t)
	dir := sharedDir(t, "hl7mail-sasl")
	port := func() string { _, p, _ := net.SplitHostPort(freePort(t)); return p }
	subPort, authPort := port(), port()
	ms := startMailServers(t, dir, []string{"SUBMISSION_PORT=" + subPort, "AUTH_PORT=" + authPort},
		"edi@hospital.test", "lab@partner.test", "slow@partner.test", "ops@hospital.test")
	smtpPort, imapPort, servers := ms.smtp, ms.imap, ms.dir

	hook := &hooks{}
	web := httptest.NewServer(hook)
	defer web.Close()
	siteKeys(t, dir, "hospital", "edi@hospital.test", "pgp")
	siteKeys(t, dir, "lab", "lab@partner.test", "pgp")
	siteKeys(t, dir, "slow", "slow@partner.test", "pgp")
	hdir := filepath.Join(dir, "hospital")
	password := filepath.Join(hdir, "smtp-password")
	os.WriteFile(password, []byte("not-the-password\n"), 0o600)
	toLab, toSlow := freePort(t), freePort(t)
	submission := fmt.Sprintf("smtp: {addr: 127.0.0.1:%s, tls: starttls, ca_file: ../servers/tls/ca.pem,", subPort)
	cfg := filepath.Join(hdir, "partners.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`self: {name: General Hospital, email: edi@hospital.test, pgp_key: private.asc}
store: var
router: {addr: %s}
%s username: edi@hospital.test, password_file: smtp-password, retry: 1s}
imap: {addr: 127.0.0.1:%s, tls: none, username: edi@hospital.test, password_file: imap-password, poll: 2s}
dashboard: {addr: %s}
alerts: {email: [ops@hospital.test], webhook: {url: %s}, digest: 3s}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc, mdn: none}
  - {name: slow, listen: %s, email: slow@partner.test, security: pgp, pgp_key: ../slow/public.asc, mdn_timeout: 3s}
`, freePort(t), submission, imapPort, freePort(t), web.URL, toLab, toSlow)), 0o600)
	in := &instance{t: t, dir: hdir, config: cfg, listen: map[string]string{"lab": toLab, "slow": toSlow}}
	in.start()
	defer in.stop()

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	used := msgs[:61]
	sendTo := func(addr string, batch [][]byte) []string { return mllpSendAll(t, mllpSend, dir, addr, batch) }
	wait := func(what string, d time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(d)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out after %s waiting for %s\nhospital log:\n%s", d, what, in.log)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// outage checks that nothing failed and exactly one alert is open: the
	// link-down alert with the server's words.
	outage := func(words string) {
		t.Helper()
		wait("the link-down alert", 30*time.Second, func() bool {
			for _, a := range in.alerts(false) {
				if a.Kind == "link-down" && strings.Contains(a.Text, words) {
					return true
				}
			}
			return false
		})
		time.Sleep(3 * time.Second) // several retries: still one alert, nothing failed
		open := in.alerts(false)
		if len(open) != 1 || open[0].Kind != "link-down" || !strings.Contains(open[0].Text, words) {
			t.Fatalf("open alerts %+v, want the one link-down alert with %q", open, words)
		}
		for _, m := range in.messages() {
			if m.State == "failed" {
				t.Fatalf("message %s failed during the outage", m.ControlID)
			}
		}
	}
	// delivered waits until the lab's Maildir holds want, submitted to
	// Postfix in that order. (Postfix delivers mails of one session in
	// parallel, so the Maildir's own order is Postfix's, not ours.)
	delivered := func(want []string) {
		t.Helper()
		wait(fmt.Sprintf("%d mails in the lab's Maildir", len(want)), 60*time.Second, func() bool {
			return len(maildir(t, servers, "lab@partner.test")) >= len(want)
		})
		control := map[string]string{} // Message-ID → control ID
		for _, m := range maildir(t, servers, "lab@partner.test") {
			control[messageID([]byte(m))] = subjectControlID(m)
		}
		if got := submittedOrder(t, servers, control); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("the lab's mails were submitted to Postfix in this order\n%v\nwant\n%v", got, want)
		}
	}
	cleared := func() {
		t.Helper()
		wait("the alert cleared", 30*time.Second, func() bool { return len(in.alerts(false)) == 0 })
	}

	// A wrong password: 535 to AUTH.
	ids := sendTo(toLab, used[:50])
	outage("535")
	os.WriteFile(password, []byte("secret\n"), 0o600)
	in.reload()
	delivered(ids)
	cleared()
	// The 50 waiting mails went on few sessions, many transactions each:
	// Postfix's own count of each logged-in session's MAIL commands, once
	// the sender closed its idle session (after 5 s).
	wait("the sessions' ends in Postfix's log", 30*time.Second, func() bool { return sum(submissionSessions(t, servers)) >= 50 })
	per := submissionSessions(t, servers)
	t.Logf("mails on each logged-in submission session, by Postfix's count: %v", per)
	if slices.Max(per) < 10 {
		t.Errorf("Postfix counted %v mails on each logged-in submission session; want the 50 on few sessions", per)
	}
	notices := func() []string { return maildir(t, servers, "ops@hospital.test") }
	wait("the alert and the cleared notice at the ops address", 60*time.Second, func() bool {
		raised, clearedNotice := false, false
		for _, m := range notices() {
			raised = raised || strings.Contains(m, "raised alert") && strings.Contains(m, "(link-down)") && strings.Contains(m, "535")
			clearedNotice = clearedNotice || strings.Contains(m, "cleared alert") && strings.Contains(m, "(link-down)")
		}
		return raised && clearedNotice
	})

	// A server that offers no AUTH while smtp.username is set: 503.
	in.edit(submission, fmt.Sprintf("smtp: {addr: 127.0.0.1:%s, tls: none,", smtpPort))
	in.reload()
	wait("the reload", 20*time.Second, func() bool {
		return strings.Count(in.log.String(), `"msg":"configuration reloaded"`) == 2
	})
	ids = append(ids, sendTo(toLab, used[50:60])...)
	outage("503")
	in.edit(fmt.Sprintf("smtp: {addr: 127.0.0.1:%s, tls: none,", smtpPort), submission)
	in.reload()
	delivered(ids)
	cleared()
	all := in.alerts(true)
	if len(all) != 2 || all[0].Cleared == "" || all[1].Cleared == "" {
		t.Errorf("alert history %+v, want the two outages, each cleared by itself", all)
	}

	// An overdue receipt: the slow partner never answers.
	sendTo(toSlow, used[60:61])
	overdue := func() (mails, posts int) {
		for _, m := range notices() {
			mails += strings.Count(m, "(receipt-overdue)")
		}
		for _, b := range hook.all() {
			posts += strings.Count(b, `"kind":"receipt-overdue"`)
		}
		return mails, posts
	}
	wait("the overdue receipt's notices", 60*time.Second, func() bool { m, p := overdue(); return m >= 1 && p >= 1 })
	time.Sleep(5 * time.Second) // no second notice of it
	if m, p := overdue(); m != 1 || p != 1 {
		t.Errorf("the overdue receipt was told in %d mails and %d webhook POSTs, want one of each", m, p)
	}

	// No notice names a patient.
	texts := append(notices(), hook.all()...)
	for _, v := range corpus.PatientData(used) {
		for _, text := range texts {
			if strings.Contains(text, v) {
				t.Fatalf("a notice holds patient data %q:\n%s", v, text)
			}
		}
	}
}

// TestRouterCE: over real Postfix and Dovecot, a lab sends two messages to
// the hospital, whose router (python3-hl7's asyncio server, scripted)
// answers the first CE twice, then AA, and the second AE. The first reaches
// the router three times with the same bytes and is delivered once; the
// second is delivered once, and each answer reaches the lab's router.
func TestRouterCE(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	requireMailServers(t)
	python := requireTool(t, "/usr/bin/python3")
	dir := sharedDir(t, "hl7mail-ce")
	ms := startMailServers(t, dir, nil, "edi@hospital.test", "lab@partner.test")
	smtpPort, imapPort := ms.smtp, ms.imap
	siteKeys(t, dir, "hospital", "edi@hospital.test", "pgp")
	siteKeys(t, dir, "lab", "lab@partner.test", "pgp")
	hospRouter := startPyRouter(t, python, filepath.Join(dir, "hospital", "router"), "CE", "CE", "AA", "AE")
	labRouter := startPyRouter(t, python, filepath.Join(dir, "lab", "router"))
	toHospital := freePort(t)
	write := func(name, email, router, partner, partnerEmail, listen string) *instance {
		cfg := filepath.Join(dir, name, "partners.yaml")
		os.WriteFile(cfg, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: private.asc}
store: var
router: {addr: %s, ack_timeout: 5s}
smtp: {addr: 127.0.0.1:%s, tls: none}
imap: {addr: 127.0.0.1:%s, tls: none, username: %s, password_file: imap-password, poll: 1s}
dashboard: {addr: %s}
partners:
  - {name: %s, listen: %s, email: %s, security: pgp, pgp_key: ../%s/public.asc}
`, name, email, router, smtpPort, imapPort, email, freePort(t), partner, listen, partnerEmail, partner)), 0o600)
		return &instance{t: t, dir: filepath.Join(dir, name), config: cfg, listen: map[string]string{partner: listen}}
	}
	hospital := write("hospital", "edi@hospital.test", hospRouter.addr, "lab", "lab@partner.test", freePort(t))
	lab := write("lab", "lab@partner.test", labRouter.addr, "hospital", "edi@hospital.test", toHospital)
	for _, in := range []*instance{hospital, lab} {
		in.start()
		defer in.stop()
	}
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	ids := mllpSendAll(t, mllpSend, dir, toHospital, msgs[100:102])
	deadline := time.Now().Add(90 * time.Second)
	for len(labRouter.messages()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("after 90s the lab's router has %d answers, the hospital's router %d frames\nhospital log:\n%s",
				len(labRouter.messages()), len(hospRouter.messages()), hospital.log)
		}
		time.Sleep(200 * time.Millisecond)
	}
	frames := hospRouter.messages()
	if len(frames) != 4 {
		t.Fatalf("the hospital's router got %d frames, want 4 (the first message three times, the second once)", len(frames))
	}
	for i, f := range frames {
		want := ids[0]
		if i == 3 {
			want = ids[1]
		}
		if h, err := hl7.ParseHeader(f); err != nil || h.ControlID != want || i > 0 && i < 3 && string(f) != string(frames[0]) {
			t.Errorf("frame %d: %v, %v; want %s, the same bytes each time", i, h, err, want)
		}
	}
	answers := map[string]hl7.AckCode{}
	for _, m := range labRouter.messages() {
		a, err := hl7.ParseAck(m)
		if err != nil {
			t.Fatalf("the lab's router got %q: %v", m, err)
		}
		answers[a.ControlID] = a.Code
	}
	if answers[ids[0]] != hl7.ApplicationAccept || answers[ids[1]] != hl7.ApplicationError {
		t.Errorf("answers at the lab's router %v, want %s AA and %s AE", answers, ids[0], ids[1])
	}
	in := 0
	for _, m := range hospital.messages() {
		if m.Direction == "in" {
			in++
			if m.State != "delivered" {
				t.Errorf("inbound %s is %s, want delivered", m.ControlID, m.State)
			}
		}
	}
	if in != 2 {
		t.Errorf("the hospital stored %d inbound messages, want 2", in)
	}
}

// submissionSessions reads Postfix's log in servers: for each session on
// the submission port that logged in, how many mails it carried (the
// mail=N of its "disconnect from" line).
func submissionSessions(t *testing.T, servers string) []int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(servers, "postfix", "log"))
	if err != nil {
		t.Fatal(err)
	}
	var per []int
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, "postfix/submission/smtpd") || !strings.Contains(line, "disconnect from") {
			continue
		}
		fields := strings.Fields(line)
		if !slices.Contains(fields, "auth=1") {
			continue
		}
		for _, f := range fields {
			if v, ok := strings.CutPrefix(f, "mail="); ok {
				n, _ := strconv.Atoi(strings.Split(v, "/")[0])
				per = append(per, n)
			}
		}
	}
	return per
}

func sum(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}

// submittedOrder reads Postfix's log in servers: the control IDs of the
// mails it took, by their Message-IDs in control, in the order its
// cleanup service took them, each once.
func submittedOrder(t *testing.T, servers string, control map[string]string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(servers, "postfix", "log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	seen := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		_, id, ok := strings.Cut(line, ": message-id=")
		if !ok || !strings.Contains(line, "/cleanup[") {
			continue
		}
		if c, ok := control[strings.TrimSpace(id)]; ok && !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	return out
}
