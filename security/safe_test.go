package security

import (
	"errors"
	"strings"
	"testing"
)

func TestHeaderFault(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"From: a@b\r\nSubject: x\r\nMSH|^~\\&|A|B\rPID|1||123||Quigglesworth^Bartholomew\r", "line 3"},
		{" folded first\r\n\r\n", "continuation"},
		{"From: a@b\r\nSubject: x", "no end"},
		{"Bad Name: x\r\n\r\n", "line 1"},
	} {
		err := HeaderFault([]byte(tt.in))
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "Quiggles") {
			t.Errorf("HeaderFault(%.30q) = %v, want ErrMalformed naming %q and nothing of the mail", tt.in, err, tt.want)
		}
	}
}

func TestToken(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"application/pgp-signature", `"application/pgp-signature"`},
		{"MSH|^~\\&|A", "(10 bytes)"},
		{strings.Repeat("a", 65), "(65 bytes)"},
		{"x\r\ny", "(4 bytes)"},
		{"Müller", "(7 bytes)"},
	} {
		if got := token(tt.in); got != tt.want {
			t.Errorf("token(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}
