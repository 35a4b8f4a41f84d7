-- Start over under a new multipart upload: new plan and fingerprint, no parts recorded.
-- From "failed", "uploading" or a "completing" whose lease has lapsed, as reopen_upload.lua.
-- Returns the new dispatch generation (a number), "fenced", or the state that forbids it.
-- Parts of the old attempt are fenced out because their mpu id no longer matches.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases, KEYS[4] attention index, KEYS[5] settled uploads. ARGV[1] expected old mpu id, ARGV[2] new mpu id, ARGV[3] now,
-- ARGV[4..] field/value pairs (size, mtime_ns, file_id, part_size, part_count, mode).
-- Under a live lease the completer may be calling CompleteMultipartUpload with the parts this
-- would wipe: the object would be completed, and then uploaded all over again.
local state = redis.call("HGET", KEYS[1], "state")
if state == "completing" then
  if tonumber(redis.call("HGET", KEYS[1], "lease_until") or "0") > tonumber(ARGV[3]) then
    return "completing"
  end
elseif state ~= "failed" and state ~= "uploading" then
  return state or "missing"
end
-- (An upload that failed before its multipart upload was created has no mpu id: "".)
if (redis.call("HGET", KEYS[1], "mpu_id") or "") ~= ARGV[1] then
  return "fenced"
end
redis.call("DEL", KEYS[2], KEYS[3])
redis.call("HSET", KEYS[1], "state", "uploading", "mpu_id", ARGV[2], "parts_done", 0, "bytes_done", 0,
  "error", "", "updated", ARGV[3])
redis.call("HDEL", KEYS[1], "lease_token", "lease_until", "finished")
if #ARGV > 4 then  -- one HSET of every pair (one per pair cost a command each: ~35 a claim)
  redis.call("HSET", KEYS[1], unpack(ARGV, 4))
end
redis.call("HINCRBY", KEYS[1], "attempt", 1)
track_attention(KEYS[1], KEYS[4], KEYS[5], ARGV[3])
return redis.call("HINCRBY", KEYS[1], "generation", 1)
