-- Record a problem a person must act on (e.g. the source changed under a resume), without a
-- state change; a failed upload's automatic resumes stop, since resuming again cannot help.
-- KEYS[1] record. ARGV[1] message, ARGV[2] now.
-- Returns 1, or 0 when there is no record (an expired or deleted checkpoint is not recreated).
if redis.call("EXISTS", KEYS[1]) == 0 then
  return 0
end
redis.call("HSET", KEYS[1], "error", ARGV[1], "updated", ARGV[2])
if redis.call("HGET", KEYS[1], "state") == "failed" then
  redis.call("HSET", KEYS[1], "retry_at", 0)
end
return 1
