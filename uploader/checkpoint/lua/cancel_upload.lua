-- Any state but "completed" (or a live completion) -> "cancelled"; expires after retention.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases, KEYS[4] attention index, KEYS[5] settled uploads, KEYS[6] the outbox.
-- ARGV[1] now, ARGV[2] retention seconds.
-- Returns "cancelled" (changed now), "already" (was cancelled), or the state that forbids it.
local state = redis.call("HGET", KEYS[1], "state")
if not state then
  return "missing"
elseif state == "cancelled" then
  return "already"
elseif state == "completed" then
  return "completed"
elseif state == "completing" and tonumber(redis.call("HGET", KEYS[1], "lease_until") or "0") > tonumber(ARGV[1]) then
  return "completing"
end
redis.call("HSET", KEYS[1], "state", "cancelled", "updated", ARGV[1], "finished", ARGV[1], "error", "cancelled by request")
redis.call("HDEL", KEYS[1], "lease_token", "lease_until")
redis.call("EXPIRE", KEYS[1], ARGV[2])
redis.call("DEL", KEYS[3])
redis.call("EXPIRE", KEYS[2], ARGV[2])
track_attention(KEYS[1], KEYS[4], KEYS[5], ARGV[1])
append_outbox(KEYS[1], KEYS[6], "cancelled", ARGV[1])
return "cancelled"
