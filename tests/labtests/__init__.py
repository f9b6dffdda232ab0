"""Tests of the loopback lab itself (DNS, PKI and SMTP servers, Postfix with Redis); its
helpers live in tests/lab/."""
