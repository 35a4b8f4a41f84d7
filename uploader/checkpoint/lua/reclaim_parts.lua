-- Take back the part leases of an uploading upload that no longer hold: their holder died (its
-- heartbeat key expired) or their deadline passed (the task hung). The caller sends those parts
-- again under the returned generation; completion follows when the last part is recorded.
-- KEYS[1] record, KEYS[2] in-flight leases. ARGV[1] heartbeat key prefix, ARGV[2] now.
-- Returns {generation, part number, ...} ({} when the upload is not uploading).
if redis.call("HGET", KEYS[1], "state") ~= "uploading" then
  return {}
end
local out = {tonumber(redis.call("HGET", KEYS[1], "generation") or "0")}
local leases = redis.call("HGETALL", KEYS[2])
for i = 1, #leases, 2 do
  if not lease_holds(leases[i + 1], ARGV[1], ARGV[2]) then
    redis.call("HDEL", KEYS[2], leases[i])
    out[#out + 1] = tonumber(leases[i])
  end
end
return out
