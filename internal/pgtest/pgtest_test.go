package pgtest
import "testing"
func TestStart(t *testing.T) {
	s, err := Start()
	if err != nil { t.Fatal(err) }
	t.Log(s.DSN)
	if err := s.Stop(); err != nil { t.Fatal(err) }
	if !WaitGone(s.Port, 5e9) { t.Error("still listening") }
}
