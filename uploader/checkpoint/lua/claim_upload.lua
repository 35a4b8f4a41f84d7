-- Create the upload record in state "creating", unless one exists already.
-- A single-PUT upload may instead be created straight in "completing" with the completion lease
-- taken (ARGV[3] the lease token): the record attach_multipart("") and begin_completion would make
-- of it next, in this one round trip, so that its coordinator sends the object at once (those two
-- round trips and a read were a third of a small upload's latency).
-- The field/value pairs may also set the state the record is born in: "uploading" with mpu_id "" for
-- a single-PUT upload a put_objects task will send (CheckpointStore.claim_queued).
-- A refusal noted earlier under the same upload id (refuse_upload.lua) is dropped.
-- KEYS[1] record hash, KEYS[2] index zset, KEYS[3] refusal hash, KEYS[4] attention index, KEYS[5] settled
-- uploads (see track_attention). ARGV[1] upload id, ARGV[2] now, ARGV[3] lease token
-- ("" for none), ARGV[4] lease seconds, ARGV[5..] field/value pairs.
-- Returns {"created"}, {"created", <the record as a field/value list>} when leased, or {"exists", state}.
local state = redis.call("HGET", KEYS[1], "state")
if state then
  return {"exists", state}
end
redis.call("HSET", KEYS[1], "state", "creating", "created", ARGV[2], "updated", ARGV[2],
  "parts_done", 0, "bytes_done", 0, "parts_sent", 0, "bytes_sent", 0, "complete_calls", 0, "generation", 1)
if #ARGV > 5 then  -- one HSET of every pair (one per pair cost a command each: ~35 a claim)
  redis.call("HSET", KEYS[1], unpack(ARGV, 5))
end
redis.call("ZADD", KEYS[2], ARGV[2], ARGV[1])
redis.call("DEL", KEYS[3])
if ARGV[3] == "" then
  track_attention(KEYS[1], KEYS[4], KEYS[5], ARGV[2])
  return {"created"}
end
if redis.call("HGET", KEYS[1], "mode") ~= "single" then
  redis.call("DEL", KEYS[1])
  redis.call("ZREM", KEYS[2], ARGV[1])
  return redis.error_reply("claim_upload: only a single-PUT upload is created with its completion lease")
end
redis.call("HSET", KEYS[1], "state", "completing", "mpu_id", "", "lease_token", ARGV[3],
  "lease_until", tonumber(ARGV[2]) + tonumber(ARGV[4]), "complete_calls", 1,
  "bytes_sent", redis.call("HGET", KEYS[1], "size"))
track_attention(KEYS[1], KEYS[4], KEYS[5], ARGV[2])
return {"created", redis.call("HGETALL", KEYS[1])}
