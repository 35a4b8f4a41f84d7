-- "completing" -> "completed", then let the checkpoint expire after the retention period.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases, KEYS[4] attention index, KEYS[5] settled uploads, KEYS[6] the outbox. ARGV[1] lease token, ARGV[2] now, ARGV[3] retention seconds,
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
if #ARGV > 4 then  -- one HSET of every pair (one per pair cost a command each: ~35 a claim)
  redis.call("HSET", KEYS[1], unpack(ARGV, 4))
end
redis.call("EXPIRE", KEYS[1], ARGV[3])
redis.call("DEL", KEYS[3])
redis.call("EXPIRE", KEYS[2], ARGV[3])
track_attention(KEYS[1], KEYS[4], KEYS[5], ARGV[2])
append_outbox(KEYS[1], KEYS[6], "completed", ARGV[2])
return "ok"
