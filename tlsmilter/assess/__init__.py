"""Domain assessment: how securely can a mail domain receive mail?

``dns`` looks names up through the configured validating resolver, ``smtp`` probes one MX
address, ``certs`` validates chains and TLSA records, ``mtasts`` fetches and parses MTA-STS
policies, ``rating`` turns facts into a level and a score (pure), and ``prober`` ties them
together for one domain.
"""
