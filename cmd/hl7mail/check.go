package main

import (
	"fmt"
	"io"

	"github.com/hl7mail/hl7mail/config"
)

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("check", "[-config FILE]", `
Validates the configuration and the key, certificate, password and token files
it names. Prints every problem with its line and exits 1, or prints a summary
and exits 0.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg, err := loadChecked(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: OK, %d partners\n", *cfgPath, len(cfg.Partners))
	for _, p := range cfg.Partners {
		fmt.Fprintf(stdout, "  %-20s listen %-21s → %s (%s)\n", p.Name, p.Listen, p.Email, p.Security)
	}
	return 0
}

// loadChecked loads the configuration and checks the files it names.
func loadChecked(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	if err := cfg.CheckFiles(); err != nil {
		return nil, err
	}
	return cfg, nil
}
