-- The recovery leader takes up to ARGV[1] settled uploads (oldest first) with the chords noted
-- for them (note_chord.lua), to delete those chords' keys from the result backend; it then
-- calls release_chords.lua. An upload that needs attention again (resumed meanwhile) is dropped
-- from the settled uploads without its chords: they are taken when it settles again.
-- KEYS[1] settled uploads, KEYS[2] attention index. ARGV[1] how many, ARGV[2] record key prefix
-- ("<prefix>:upload:").
-- Returns {upload id, "<group id> <group id> ...", ...}.
local out = {}
for _, upload_id in ipairs(redis.call("ZRANGE", KEYS[1], 0, tonumber(ARGV[1]) - 1)) do
  if redis.call("ZSCORE", KEYS[2], upload_id) then
    redis.call("ZREM", KEYS[1], upload_id)
  else
    local chords = redis.call("SMEMBERS", ARGV[2] .. upload_id .. ":chords")
    if #chords == 0 then
      redis.call("ZREM", KEYS[1], upload_id)
    else
      out[#out + 1] = upload_id
      out[#out + 1] = table.concat(chords, " ")
    end
  end
end
return out
