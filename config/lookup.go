package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Path resolves p relative to the folder of the configuration file.
func (c *Config) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(filepath.Dir(c.File), p)
}

// StoreDir is the absolute or config-relative store folder.
func (c *Config) StoreDir() string { return c.Path(c.Store) }

// RouterFor returns the router address for inbound messages of partner p.
func (c *Config) RouterFor(p *Partner) string {
	if p.Router != "" {
		return p.Router
	}
	return c.Router.Addr
}

// RouterForMail returns the router for a message of partner p that was
// sent to recipient: the router of that local address, if it has one,
// else RouterFor(p).
func (c *Config) RouterForMail(p *Partner, recipient string) string {
	if l := c.LocalAddress(recipient); l != nil && l.Router != "" {
		return l.Router
	}
	return c.RouterFor(p)
}

// ReturnRoute names the partner that answers go to for messages from a
// sending application (MSH-3) and facility (MSH-4, empty for any); each is
// compared by its first component, without regard to case.
type ReturnRoute struct {
	Application string `yaml:"application"`
	Facility    string `yaml:"facility"`
	Partner     string `yaml:"partner"`
}

// ReturnRouteFor returns the partner the first matching return route
// names for a message from app (the first component of MSH-3) at facility
// (of MSH-4), or nil.
func (c *Config) ReturnRouteFor(app, facility string) *Partner {
	for _, r := range c.ReturnRoutes {
		if strings.EqualFold(strings.TrimSpace(r.Application), app) &&
			(r.Facility == "" || strings.EqualFold(strings.TrimSpace(r.Facility), facility)) {
			return c.Partner(r.Partner)
		}
	}
	return nil
}

// LocalAddress returns the local address addr, or nil.
func (c *Config) LocalAddress(addr string) *Local {
	for i := range c.Local {
		if strings.EqualFold(c.Local[i].Address, addr) {
			return &c.Local[i]
		}
	}
	return nil
}

// IsOurs reports whether addr is self.email or a local address.
func (c *Config) IsOurs(addr string) bool {
	return strings.EqualFold(addr, c.Self.Email) || c.LocalAddress(addr) != nil
}

// FromFor returns the address mail to partner p is sent from.
func (c *Config) FromFor(p *Partner) string {
	if p.Local != "" {
		return p.Local
	}
	return c.Self.Email
}

// Partner returns the partner named name, or nil.
func (c *Config) Partner(name string) *Partner {
	for i := range c.Partners {
		if c.Partners[i].Name == name {
			return &c.Partners[i]
		}
	}
	return nil
}

// PartnerByEmail returns the partner whose address is addr (without regard
// to case), or nil; partner addresses are unique (validated).
func (c *Config) PartnerByEmail(addr string) *Partner {
	for i := range c.Partners {
		if addr != "" && strings.EqualFold(c.Partners[i].Email, addr) {
			return &c.Partners[i]
		}
	}
	return nil
}

// Secret reads a password or passphrase from file (relative to the
// configuration, trailing line ends removed) or from the environment
// variable env; it returns "" when neither is named.
func (c *Config) Secret(file, env string) (string, error) {
	switch {
	case file != "":
		b, err := os.ReadFile(c.Path(file))
		if err != nil {
			return "", err
		}
		return strings.TrimRight(string(b), "\r\n"), nil
	case env != "":
		v, ok := os.LookupEnv(env)
		if !ok {
			return "", fmt.Errorf("environment variable %s is not set", env)
		}
		return v, nil
	}
	return "", nil
}
