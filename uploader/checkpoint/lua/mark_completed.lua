-- "completing" -> "completed", then let the checkpoint expire after the retention period.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases. ARGV[1] lease token, ARGV[2] now, ARGV[3] retention seconds,
-- ARGV[4..] field/value pairs (final ETag, verification result).
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "completing" then
  return state or "missing"
end
if redis.call("HGET", KEYS[1], "lease_token") ~= ARGV[1] then
  return "fenced"
end
redis.call("HSET", KEYS[1], "state", "completed", "updated", ARGV[2], "finished", ARGV[2], "error", "")
redis.call("HDEL", KEYS[1], "lease_token", "lease_until")
for i = 4, #ARGV, 2 do
  redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call("EXPIRE", KEYS[1], ARGV[3])
redis.call("DEL", KEYS[3])
redis.call("EXPIRE", KEYS[2], ARGV[3])
return "ok"
