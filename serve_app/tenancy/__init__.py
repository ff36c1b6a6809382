"""Tenancy: hospitals, their API keys and quotas, fair scheduling with STAT priority, and the audit trail.

settings.py  the ``tenants``, ``scheduling`` and ``audit`` sections of the config
keys.py      API keys: made once, stored only as hashes
quota.py     token buckets, concurrency counts and the fair STAT-first queue (pure, no Ray)
audit.py     one JSON line per request, with the StudyInstanceUID only as a salted hash
gatekeeper.py  what the ingress calls: authenticate, authorise, admit, queue, audit
"""
