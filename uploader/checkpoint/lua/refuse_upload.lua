-- Note why a request was refused before anything was created, under its upload id, so that
-- `status` can say why (the submitter also gets the error from the start task's result).
-- Nothing is noted when a record exists under that id: the refusal was of a duplicate or
-- conflicting request, and the record speaks for the upload.
-- KEYS[1] record, KEYS[2] refusal hash. ARGV[1] reason, ARGV[2] now, ARGV[3] seconds to keep it,
-- ARGV[4] the kind of error (its class name, for clients to raise the same).
-- Returns 1 when noted, 0 when a record exists.
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
redis.call("DEL", KEYS[2])
redis.call("HSET", KEYS[2], "reason", ARGV[1], "at", ARGV[2], "kind", ARGV[4])
redis.call("EXPIRE", KEYS[2], ARGV[3])
return 1
