-- A part task gives up its in-flight lease without recording (stale message, failure).
-- KEYS[1] in-flight leases. ARGV[1] part number, ARGV[2] owner "<holder>|<task>".
local lease = redis.call("HGET", KEYS[1], ARGV[1])
if lease and parse_lease(lease) == ARGV[2] then
  return redis.call("HDEL", KEYS[1], ARGV[1])
end
return 0
