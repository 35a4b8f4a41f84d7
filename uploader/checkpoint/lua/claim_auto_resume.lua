-- The reconciler claims one automatic resume of an upload that failed for a transient reason,
-- once its "retry_at" has come. Atomic, so two reconcilers never both resume it, and counted, so
-- a failure that keeps coming back ends after the allowed number of resumes.
-- KEYS[1] record. ARGV[1] now, ARGV[2] automatic resumes allowed, ARGV[3] first wait (seconds),
-- ARGV[4] the longest wait.
-- Returns the number of this resume (1, 2, ...), or 0 when there is nothing to claim. The next
-- "retry_at" is set already, so a resume that itself fails on a transient error (S3 still down)
-- is tried again later; a successful resume leaves "failed" and the field no longer matters.
if redis.call("HGET", KEYS[1], "state") ~= "failed" then
  return 0
end
local now = tonumber(ARGV[1])
local retry_at = tonumber(redis.call("HGET", KEYS[1], "retry_at") or "0")
if retry_at <= 0 or retry_at > now then
  return 0
end
local made = redis.call("HINCRBY", KEYS[1], "auto_resumes", 1)
local next_at = 0
if made < tonumber(ARGV[2]) then
  next_at = now + math.min(tonumber(ARGV[3]) * 2 ^ made, tonumber(ARGV[4]))
end
redis.call("HSET", KEYS[1], "retry_at", next_at, "updated", ARGV[1])
return made
