module connector-credential-operator/tests/localnode/pause

go 1.22
