-- Put uploads in recovery's attention index, or take them out, as their records say (see
-- track_attention): the one-time migration of records written before the index existed (and
-- by workers of an older version during a rolling upgrade), and the reconciler's repair of an
-- entry whose record expired.
-- KEYS[1] attention index, KEYS[2] settled uploads, KEYS[3..] records. ARGV[1] now.
-- Returns the number of those uploads that need attention.
local count = 0
for i = 3, #KEYS do
  if track_attention(KEYS[i], KEYS[1], KEYS[2], ARGV[1]) then
    count = count + 1
  end
end
return count
