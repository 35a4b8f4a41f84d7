-- The reconciler claims one automatic resume of an upload that failed for a transient reason,
-- once its "retry_at" has come. Atomic, so two reconcilers never both resume it, and counted, so
-- a failure that keeps coming back ends after the allowed number of resumes.
-- KEYS[1] record, KEYS[2] attention index, KEYS[3] settled uploads, KEYS[4] the outbox. ARGV[1] now, ARGV[2] automatic resumes allowed, ARGV[3] first wait (seconds),
-- ARGV[4] the longest wait.
-- Returns the number of this resume (1, 2, ...), or 0 when there is nothing to claim (and, when
-- no resume is left, makes the failure final: "retry_at" 0, and writes its outbox events).
-- The next "retry_at" is set already: while the resume runs the upload does not look finally
-- failed to clients, and a resume that itself fails on a transient error (S3 still down) is
-- claimed again later; a successful one leaves "failed" and the field no longer matters.
if redis.call("HGET", KEYS[1], "state") ~= "failed" then
  return 0
end
local now = tonumber(ARGV[1])
local retry_at = tonumber(redis.call("HGET", KEYS[1], "retry_at") or "0")
if retry_at <= 0 or retry_at > now then
  return 0
end
if tonumber(redis.call("HGET", KEYS[1], "auto_resumes") or "0") >= tonumber(ARGV[2]) then
  redis.call("HSET", KEYS[1], "retry_at", 0, "updated", ARGV[1])
  track_attention(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
  append_outbox(KEYS[1], KEYS[4], "failed", ARGV[1])
  return 0
end
local made = redis.call("HINCRBY", KEYS[1], "auto_resumes", 1)
redis.call("HSET", KEYS[1], "retry_at", next_resume_at(now, made, ARGV[3], ARGV[4]), "updated", ARGV[1])
return made
