-- Any active state -> "failed" with a readable reason. Terminal states are left alone.
-- KEYS[1] record. ARGV[1] reason, ARGV[2] now.
-- Returns the previous state, or "inactive:<state>" when nothing changed.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "uploading" and state ~= "completing" and state ~= "creating" then
  return "inactive:" .. (state or "missing")
end
redis.call("HSET", KEYS[1], "state", "failed", "error", ARGV[1], "updated", ARGV[2], "finished", ARGV[2])
redis.call("HDEL", KEYS[1], "lease_token", "lease_until")
return state
