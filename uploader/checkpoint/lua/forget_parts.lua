-- Drop recorded parts the server no longer holds (found by ListParts on resume).
-- KEYS[1] record, KEYS[2] parts. ARGV[1] mpu id, ARGV[2..] part numbers.
-- Returns the number of parts forgotten, -2 when the state forbids it (only "uploading" and
-- "failed" uploads forget parts), or -1 when fenced by another attempt (mpu id).
-- Not in "completing": the completer has read the parts and may be calling Complete with them, and
-- a token taking over a lapsed lease gets "go" without the parts being counted again. Not in
-- "completed" or "cancelled": their parts are final. Resume reads the state before it lists
-- parts, so the state can have moved on by the time it gets here.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "uploading" and state ~= "failed" then
  return -2
end
if redis.call("HGET", KEYS[1], "mpu_id") ~= ARGV[1] then
  return -1
end
local forgotten = 0
for i = 2, #ARGV do
  local value = redis.call("HGET", KEYS[2], ARGV[i])
  if value then
    local size = cjson.decode(value)["size"]
    redis.call("HDEL", KEYS[2], ARGV[i])
    redis.call("HINCRBY", KEYS[1], "parts_done", -1)
    redis.call("HINCRBY", KEYS[1], "bytes_done", -size)
    forgotten = forgotten + 1
  end
end
return forgotten
