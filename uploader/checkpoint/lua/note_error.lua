-- Record a problem a person must act on (e.g. the source changed under a resume), without a
-- state change; a failed upload's automatic resumes stop, since resuming again cannot help.
-- KEYS[1] record, KEYS[2] attention index, KEYS[3] settled uploads, KEYS[4] the outbox. ARGV[1] message, ARGV[2] now.
-- A failure that had an automatic resume to come becomes final here: its outbox events are written.
-- Returns 1, or 0 when there is no record (an expired or deleted checkpoint is not recreated).
if redis.call("EXISTS", KEYS[1]) == 0 then
  return 0
end
redis.call("HSET", KEYS[1], "error", ARGV[1], "updated", ARGV[2])
if redis.call("HGET", KEYS[1], "state") == "failed" then
  local pending = (tonumber(redis.call("HGET", KEYS[1], "retry_at") or "0") or 0) > 0
  redis.call("HSET", KEYS[1], "retry_at", 0)
  track_attention(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
  if pending then
    append_outbox(KEYS[1], KEYS[4], "failed", ARGV[2])
  end
end
return 1
