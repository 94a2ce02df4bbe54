# hl7mail — see README.md. `make test` installs what the tests need
# (integration/deps.sh: Debian packages, as root) and runs every test.
GO ?= go
VERSION ?= $(shell sh deploy/version.sh)
GOFLAGS_TEST ?= -race -shuffle=on -count=1
FUZZTIME ?= 30s

.PHONY: build test soak check fmt-check vet fuzz bench demo deps deb clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o bin/hl7mail ./cmd/hl7mail

# The Debian package, dist/hl7mail_<version>_amd64.deb (deploy/nfpm.yaml).
deb: build
	mkdir -p dist && rm -f dist/hl7mail_*.deb
	sed 's#^store: var/hl7mail#store: /var/lib/hl7mail#' partners.yaml > dist/partners.yaml
	VERSION=$(VERSION) $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2 package -f deploy/nfpm.yaml -p deb -t dist/

deps:
	bash integration/deps.sh

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# Every test, the real-part tests included (they fail, not skip, when a
# package is missing).
# The fault suite's table is printed at the end.
test: deps fmt-check vet
	rm -f var/artifacts/faults.txt
	HL7MAIL_REQUIRE_REAL=1 $(GO) test $(GOFLAGS_TEST) -timeout 15m ./...
	@cat var/artifacts/faults.txt

# The fault suite, long: 3,000 messages, 15 kills per kill case, 20 s outages.
soak: deps
	HL7MAIL_SOAK=1 HL7MAIL_REQUIRE_REAL=1 $(GO) test -race -count=1 -timeout 60m -run TestFaults -v ./integration
	@cat var/artifacts/faults.txt

check: fmt-check vet
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

# Runs each fuzz target for FUZZTIME; new failing inputs land in testdata/fuzz.
fuzz:
	$(GO) test -run=^$$ -fuzz=FuzzParseHeader -fuzztime=$(FUZZTIME) ./hl7
	$(GO) test -run=^$$ -fuzz=FuzzReadFrame -fuzztime=$(FUZZTIME) ./mllp
	$(GO) test -run=^$$ -fuzz=FuzzRoundTrip -fuzztime=$(FUZZTIME) ./mllp
	for f in FuzzMultipartParts FuzzParseMDN FuzzParseBundle FuzzDecodeEDI FuzzPGPOpen FuzzSMIMEOpen FuzzCanonical FuzzLoadKeyFiles; do \
		$(GO) test -run=^$$ -fuzz=^$$f\$$ -fuzztime=$(FUZZTIME) ./security || exit 1; done

# Go benchmarks, then the CA latency/throughput table against the fsync baseline.
bench:
	$(GO) test -run=^$$ -bench=. -benchmem ./...
	$(GO) run ./cmd/hl7mail bench

# The whole loop on embedded mail servers; see "hl7mail demo -h".
demo:
	$(GO) run ./cmd/hl7mail demo -once

clean:
	rm -rf bin var dist
