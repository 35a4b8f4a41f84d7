-- Any active state -> "failed" with a readable reason. Terminal states are left alone.
-- KEYS[1] record, KEYS[2] attention index, KEYS[3] settled uploads, KEYS[4] the outbox. ARGV[1] reason, ARGV[2] now, ARGV[3] the failing dispatch's generation (0: any),
-- ARGV[4] automatic resumes allowed for this failure (0: it is final: a permanent error, or
-- retrying is off), ARGV[5] seconds before the first automatic resume (doubling with each one
-- already made), ARGV[6] the longest such wait.
-- A final failure (no automatic resume to come) is a terminal transition: it writes its outbox
-- events (see append_outbox); a transient one does not, its last resume may still succeed.
-- Sets "retry_at": when the reconciler may resume the upload by itself (0: never).
-- Returns the previous state, or "inactive:<state>" when nothing changed: a failure reported by a
-- superseded dispatch (e.g. a chord errback arriving after a resume) does not fail the new one.
local state = redis.call("HGET", KEYS[1], "state")
if tonumber(ARGV[3]) > 0 and tonumber(ARGV[3]) < tonumber(redis.call("HGET", KEYS[1], "generation") or "0") then
  return "inactive:stale"
end
if state ~= "uploading" and state ~= "completing" and state ~= "creating" then
  return "inactive:" .. (state or "missing")
end
local now = tonumber(ARGV[2])
local made = tonumber(redis.call("HGET", KEYS[1], "auto_resumes") or "0")
local retry_at = 0
if made < tonumber(ARGV[4] or "0") then
  retry_at = next_resume_at(now, made, ARGV[5], ARGV[6])
end
redis.call("HSET", KEYS[1], "state", "failed", "error", ARGV[1], "updated", ARGV[2], "finished", ARGV[2],
  "retry_at", retry_at)
redis.call("HDEL", KEYS[1], "lease_token", "lease_until")
track_attention(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
if retry_at == 0 then
  append_outbox(KEYS[1], KEYS[4], "failed", ARGV[2])
end
return state
