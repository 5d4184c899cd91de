// An attacker's TLS client for the fleet server's HTTPS API: it presents CERT (an operator's
// certificate, which is public) but signs the TLS handshake with KEY, a key of its own. Go's
// tls.Certificate, built by hand, does not check that the two belong together (Deno, curl and
// OpenSSL refuse to even try), so the server's own check of the handshake signature
// (CertificateVerify) is what is tested.
//
// usage: tls_key_mismatch CERT KEY CA URL  ->  prints "STATUS BODY" (exit 0) or "ERR ..." (exit 3)
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: tls_key_mismatch CERT KEY CA URL")
		os.Exit(2)
	}
	certPEM, err := os.ReadFile(os.Args[1])
	check(err)
	keyPEM, err := os.ReadFile(os.Args[2])
	check(err)
	caPEM, err := os.ReadFile(os.Args[3])
	check(err)
	var chain [][]byte
	for rest := certPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		chain = append(chain, b.Bytes)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		check(fmt.Errorf("%s: no PEM key", os.Args[2]))
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	check(err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	versions := []uint16{tls.VersionTLS13, tls.VersionTLS12}
	if v := os.Getenv("TLS_VERSION"); v == "1.2" {
		versions = versions[1:]
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:      pool,
		Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: key}},
		MinVersion:   tls.VersionTLS12,
		MaxVersion:   versions[0],
	}}}
	r, err := c.Get(os.Args[4])
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(3)
	}
	body, _ := io.ReadAll(r.Body)
	fmt.Println(r.StatusCode, string(body))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
