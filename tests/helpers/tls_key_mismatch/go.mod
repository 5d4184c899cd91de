module k8s4r.test/tls_key_mismatch

go 1.25
