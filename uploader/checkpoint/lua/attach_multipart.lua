-- "creating" -> "uploading", recording the object store's multipart upload id.
-- KEYS[1] record. ARGV[1] mpu id ("" for the single-PUT path), ARGV[2] now.
-- Returns "ok", or the state that forbade it (e.g. "cancelled": the caller aborts what it made).
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "creating" then
  return state or "missing"
end
redis.call("HSET", KEYS[1], "state", "uploading", "mpu_id", ARGV[1], "updated", ARGV[2])
return "ok"
