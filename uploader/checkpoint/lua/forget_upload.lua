-- The janitor forgets an abandoned upload: its record, parts and leases go, and it leaves the
-- index and recovery's attention index (its chords, if any, are left for the recovery leader to
-- delete: see track_attention).
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases, KEYS[4] index, KEYS[5] attention index,
-- KEYS[6] settled uploads. ARGV[1] upload id, ARGV[2] now.
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
redis.call("ZREM", KEYS[4], ARGV[1])
track_attention(KEYS[1], KEYS[5], KEYS[6], ARGV[2])
return "ok"
