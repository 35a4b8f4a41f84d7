-- A part task announces it is about to send part ARGV[1] for dispatch generation ARGV[2].
-- ARGV[3] is the lease owner "<holder>|<task execution>" (the holder is a worker incarnation or a
-- prefork pool process); the lease lives as long as the holder's heartbeat key ARGV[4] .. "<holder>",
-- and at most ARGV[5] seconds plus the part's length over ARGV[7] bytes per second (its time
-- limit: see parse_lease) from ARGV[6], now.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases.
-- Returns {"send", mpu_id, source, bucket, key, size, mtime_ns, offset, length, file_id, endpoint,
-- checksum_algorithm, options, max_bandwidth, source_credentials, source_endpoint} (and counts the
-- bytes as sent: one round trip gives the part task everything it needs), {"recorded"} when the
-- part is in the checkpoint already, {"stale"} when a newer dispatch superseded this message (its
-- part, if still missing, was dispatched again), {"leased"} when another task on a live worker is
-- sending it, {"unplanned"} when the part number is outside 1..part_count (nothing leased or
-- counted: such a part has no byte range, and recording it would count towards completion), or
-- {"inactive", state}, or {"limited", live} when the upload's max_concurrency parts are being
-- sent already (``live`` leases of other parts hold): nothing is leased or counted, and the
-- record's "throttled" is set to now, so that the reconciler does not take an upload whose parts
-- wait their turn for a stalled one.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "uploading" then
  return {"inactive", state or "missing"}
end
if tonumber(ARGV[2]) < tonumber(redis.call("HGET", KEYS[1], "generation") or "0") then
  return {"stale"}
end
local number = planned_part(ARGV[1], KEYS[1])
if not number then
  return {"unplanned"}
end
if redis.call("HEXISTS", KEYS[2], ARGV[1]) == 1 then
  return {"recorded"}
end
-- The lease's own owner takes it again: redis-py resends this call when the connection dropped
-- after it ran, and that replay must get its lease back. A duplicate delivery of the part task is
-- another owner (one per execution: uploader/checkpoint/store.py part_lease_owner), so "leased".
local lease = redis.call("HGET", KEYS[3], ARGV[1])
if lease and parse_lease(lease) ~= ARGV[3] and lease_holds(lease, ARGV[4], ARGV[6]) then
  return {"leased"}
end
-- The cap counts the leases that hold (lease_holds): a dead holder's or a hung task's lease no
-- longer takes a place, so waiting parts cannot wait for ever behind it. Counted here, in the
-- script that takes the lease, so two parts can never both take the last place.
local cap = tonumber(redis.call("HGET", KEYS[1], "max_concurrency") or "0") or 0
if cap > 0 then
  local live = 0
  local leases = redis.call("HGETALL", KEYS[3])
  for i = 1, #leases, 2 do
    if leases[i] ~= ARGV[1] and lease_holds(leases[i + 1], ARGV[4], ARGV[6]) then
      live = live + 1
    end
  end
  if live >= cap then
    redis.call("HSET", KEYS[1], "throttled", ARGV[6])
    return {"limited", tostring(live)}
  end
end
local f = redis.call("HMGET", KEYS[1], "mpu_id", "source", "bucket", "key", "size", "mtime_ns", "part_size", "file_id", "endpoint",
  "checksum_algorithm", "options", "max_bandwidth", "source_credentials", "source_endpoint")
local size, part_size = tonumber(f[5]), tonumber(f[7])
local offset = (number - 1) * part_size
local length = math.min(part_size, size - offset)
local deadline = tonumber(ARGV[6]) + tonumber(ARGV[5]) + length / tonumber(ARGV[7])
redis.call("HSET", KEYS[3], ARGV[1], ARGV[3] .. "|" .. string.format("%.3f", deadline))
redis.call("HINCRBY", KEYS[1], "parts_sent", 1)
redis.call("HINCRBY", KEYS[1], "bytes_sent", length)
return {"send", f[1], f[2], f[3], f[4], f[5], f[6], tostring(offset), tostring(length), f[8] or "", f[9] or "", f[10] or "", f[11] or "", f[12] or "0", f[13] or "", f[14] or ""}
