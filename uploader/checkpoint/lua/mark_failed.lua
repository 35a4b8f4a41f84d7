-- Any active state -> "failed" with a readable reason. Terminal states are left alone.
-- KEYS[1] record. ARGV[1] reason, ARGV[2] now, ARGV[3] the failing dispatch's generation (0: any).
-- Returns the previous state, or "inactive:<state>" when nothing changed: a failure reported by a
-- superseded dispatch (e.g. a chord errback arriving after a resume) does not fail the new one.
local state = redis.call("HGET", KEYS[1], "state")
if tonumber(ARGV[3]) > 0 and tonumber(ARGV[3]) < tonumber(redis.call("HGET", KEYS[1], "generation") or "0") then
  return "inactive:stale"
end
if state ~= "uploading" and state ~= "completing" and state ~= "creating" then
  return "inactive:" .. (state or "missing")
end
redis.call("HSET", KEYS[1], "state", "failed", "error", ARGV[1], "updated", ARGV[2], "finished", ARGV[2])
redis.call("HDEL", KEYS[1], "lease_token", "lease_until")
return state
